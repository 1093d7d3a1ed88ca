"""Indexed data sets: every sample comes with its own index, so stored outputs stay aligned.

Data sets (nothing is ever downloaded):

* ``"digits"`` (default): scikit-learn's real 8x8 handwritten digits (1,797 images, shipped
  with scikit-learn), shape ``(1, 8, 8)``, pixels scaled to [0, 1] then standardised with the
  train mean/std. Fixed stratified split: 1,437 train / 360 test (``random_state=0``).
* ``"mnist1d"``: MNIST-1D (Greydanus 2020) generated offline by
  ``mnist1d.data.make_dataset`` with its default arguments (seed 42): 4,000 train /
  1,000 test, shape ``(1, 40)``. Cached in memory (and in ``~/.cache/saf-toolkit``).
* ``"cifar10"`` / ``"cifar100"``: the standard *python* format folder
  (``cifar-10-batches-py`` / ``cifar-100-python``, or its parent) given by ``data_dir``;
  normalised per channel; with ``augment=True`` the standard random crop (pad 4) and
  horizontal flip.

Sample-id alignment holds by construction: :class:`IndexedDataset` returns ``(x, y, i)``
and :meth:`IndexedDataset.get_batch` fetches a batch by the very index tensor it returns.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from analysis.io import atomic_write_with

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100")
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class IndexedDataset(torch.utils.data.Dataset):
    """In-memory data set whose items are ``(x, y, index)``.

    Args:
        x: inputs, shape ``(N, *in_shape)``, float32.
        y: integer class labels, shape ``(N,)``.
        num_classes: number of classes.
        augment: apply the CIFAR augmentation (random crop with 4-pixel padding and
            horizontal flip) when fetching.

    Attributes:
        num_classes, in_shape: what a model needs to be built.
    """

    def __init__(self, x: Tensor, y: Tensor, num_classes: int, augment: bool = False):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x.float().contiguous(), y.long().contiguous()
        self.num_classes, self.in_shape = int(num_classes), tuple(x.shape[1:])
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x, y, idx = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0], int(idx[0])

    def get_batch(self, idx: Tensor, generator: torch.Generator | None = None):
        """The batch ``(x[idx], y[idx], idx)`` on the data's device; augmentation draws
        from ``generator`` (a CPU generator, so the draws do not depend on the device)."""
        idx = idx.to(self.x.device)
        x = self.x.index_select(0, idx)
        if self.augment:
            x = _crop_flip(x, generator)
        return x, self.y.index_select(0, idx), idx

    def to(self, device) -> IndexedDataset:
        """A copy whose tensors live on ``device`` (e.g. the GPU: no per-batch transfer)."""
        out = IndexedDataset.__new__(IndexedDataset)
        out.__dict__.update(self.__dict__, x=self.x.to(device), y=self.y.to(device))
        return out

    def subset(self, keep: Tensor) -> IndexedDataset:
        """The samples ``keep`` (indices), renumbered from 0."""
        return IndexedDataset(self.x[keep], self.y[keep], self.num_classes, self.augment)


class MapDataset:
    """Any map-style data set of ``(x, y)`` items, as the trainer reads it: a batch at a time.

    Args:
        dataset: ``dataset[i] -> (x, y)`` with ``len(dataset)``; ``x`` a tensor (or
            array), ``y`` an integer class. Its own transforms run as they are.
        num_classes: the number of classes (default: ``dataset.num_classes``,
            ``len(dataset.classes)``, or one more than the largest label).

    The labels are read once, from ``dataset.targets`` when it has them (torchvision's
    convention), else from every item.
    """

    def __init__(self, dataset, num_classes: int | None = None):
        if len(dataset) < 1:
            raise ValueError("the data set is empty")
        self.dataset = dataset
        targets = getattr(dataset, "targets", None)
        try:
            items = range(len(dataset))
            labels = targets if targets is not None else [dataset[i][1] for i in items]
            self.y = torch.as_tensor(labels).long().reshape(-1)
            x0 = torch.as_tensor(dataset[0][0])
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"the data set's items must be (x, y) pairs of a tensor and an "
                             f"integer class ({type(e).__name__}: {e})") from None  # fmt: skip
        if len(self.y) != len(dataset) or (self.y < 0).any():
            raise ValueError("the data set's labels must be one integer >= 0 per item")
        classes = getattr(dataset, "classes", None)
        self.num_classes = int(
            num_classes or getattr(dataset, "num_classes", 0) or (classes and len(classes))
            or int(self.y.max()) + 1
        )  # fmt: skip
        self.in_shape = tuple(x0.shape)
        self.augment = False

    def __len__(self) -> int:
        return len(self.y)

    def get_batch(self, idx: Tensor, generator: torch.Generator | None = None):
        """The batch ``(x, y, idx)``, stacked from the items (their own transforms apply)."""
        xs = [torch.as_tensor(self.dataset[int(i)][0]) for i in idx]
        return torch.stack(xs).float(), self.y.index_select(0, idx.cpu()), idx

    def to(self, device) -> MapDataset:
        """Itself: items are fetched on the CPU and moved batch by batch."""
        return self

    def subset(self, keep: Tensor) -> MapDataset:
        """The items ``keep`` (indices), renumbered from 0."""
        out = MapDataset.__new__(MapDataset)
        out.__dict__.update(self.__dict__)
        out.dataset = torch.utils.data.Subset(self.dataset, keep.tolist())
        out.y = self.y[keep]
        return out


def _crop_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Random crop after zero padding by 4 pixels, and random horizontal flip (per sample)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h  # (n, h)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (n, w), flipped
    ch = torch.arange(c, device=x.device)
    n_ = torch.arange(n, device=x.device)
    return padded[
        n_[:, None, None, None],
        ch[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def load_dataset(
    name: str = "digits", split: str = "train", data_dir=None, augment: bool = False
) -> IndexedDataset:
    """Load a data set by name as an :class:`IndexedDataset`.

    Args:
        name: one of ``digits``, ``mnist1d``, ``cifar10``, ``cifar100``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder of the CIFAR python-format files (CIFAR only).
        augment: standard augmentation (CIFAR train only; ignored otherwise).

    Raises:
        ValueError: unknown name or split, or a missing/incomplete CIFAR folder.

    >>> ds = load_dataset("digits")
    >>> len(ds), ds.in_shape, ds.num_classes, int(ds[5][2])
    (1437, (1, 8, 8), 10, 5)
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        x, y, c = _digits(split)
    elif name == "mnist1d":
        x, y, c = _mnist1d(split)
    elif name in ("cifar10", "cifar100"):
        x, y, c = _cifar(name, split, data_dir)
        return IndexedDataset(x, y, c, augment=augment and split == "train")
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return IndexedDataset(x, y, c)


def data_batches(
    name: str = "digits",
    split: str = "train",
    batch_size: int = 256,
    limit: int | None = None,
    data_dir=None,
    device="cpu",
) -> list[tuple[Tensor, Tensor]]:
    """Plain ``(x, y)`` batches in a fixed order, no augmentation (for analysis and surfaces).

    Args:
        limit: use only a fixed, class-balanced subset of ``limit`` samples (the first
            ``ceil(limit/C)`` of each class in data-set order, then the first ``limit``).

    >>> [tuple(x.shape) for x, _ in data_batches("digits", limit=100, batch_size=64)]
    [(64, 1, 8, 8), (36, 1, 8, 8)]
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1, got {batch_size}, {limit}")
    ds = load_dataset(name, split, data_dir)
    idx = torch.arange(len(ds)) if limit is None else balanced_subset(ds.y, ds.num_classes, limit)
    return [(ds.x[i].to(device), ds.y[i].to(device)) for i in idx.split(batch_size)]


def balanced_subset(y: Tensor, num_classes: int, limit: int) -> Tensor:
    """First ``ceil(limit/C)`` indices of each class, interleaved by class, cut at ``limit``."""
    per = -(-limit // num_classes)
    rank = torch.zeros_like(y)
    for c in range(num_classes):
        m = y == c
        rank[m] = torch.arange(int(m.sum()))
    keep = torch.nonzero(rank < per).squeeze(1)
    order = torch.argsort(rank[keep] * num_classes + y[keep], stable=True)
    return keep[order][:limit].sort().values


@functools.lru_cache(maxsize=2)
def _digits(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(
        x, d.target, test_size=360, stratify=d.target, random_state=0
    )
    mean, std = xtr.mean(), xtr.std()
    x, y = (xtr, ytr) if split == "train" else (xte, yte)
    return torch.from_numpy((x - mean) / std)[:, None], torch.from_numpy(y), 10


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays():
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saf-toolkit"
    path = cache / "mnist1d-default-seed42.npz"
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError):
        pass
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()  # make_dataset reseeds them
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
    with contextlib.suppress(OSError):  # the cache is an optimisation only
        atomic_write_with(path, lambda f: np.savez(f, **arrays))
    return arrays


def _mnist1d(split: str):
    a = _mnist1d_arrays()
    x, y = (a["x"], a["y"]) if split == "train" else (a["x_test"], a["y_test"])
    return torch.from_numpy(x.astype(np.float32))[:, None], torch.from_numpy(y.astype(np.int64)), 10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python files: refuses anything but numpy arrays and builtins."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in a CIFAR file")
        found = super().find_class(module, name)
        return _bounded(found) if name == "_reconstruct" else found


_MAX_ELEMENTS = 60_000 * 3072  # the largest CIFAR array (every image of CIFAR-100/10 train)


def _bounded(reconstruct):
    """numpy's array constructor, refusing a shape larger than any CIFAR file holds (a file
    must not choose how much memory is allocated for it)."""

    def build(cls, shape, dtype):
        n = 1
        for d in shape if isinstance(shape, tuple) else (shape,):
            if not isinstance(d, int) or d < 0:
                raise pickle.UnpicklingError(f"bad array shape {shape!r} in a CIFAR file")
            n *= d
        if n > _MAX_ELEMENTS:
            raise pickle.UnpicklingError(f"an array of {n} elements is larger than CIFAR's")
        return reconstruct(cls, shape, dtype)

    return build


class _CifarFileError(ValueError, pickle.UnpicklingError):
    """An unreadable or unsafe CIFAR file (a ValueError: the CLI prints one line)."""


def _cifar(name: str, split: str, data_dir):
    if data_dir is None:
        raise ValueError(f"{name} needs --data-dir: a folder with the python-format files")
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    root = Path(data_dir)
    root = root / sub if (root / sub).is_dir() else root
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key, classes = b"labels", 10
    else:
        files, key, classes = [split], b"fine_labels", 100
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ValueError(f"{name}: {root} lacks {', '.join(missing)} (python-format CIFAR files)")
    xs, ys = [], []
    for f in files:
        try:
            with open(root / f, "rb") as fh:
                d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
            data, labels = np.asarray(d[b"data"]), np.asarray(d[key])
        except (pickle.UnpicklingError, EOFError, LookupError, TypeError, ValueError,
                MemoryError, OverflowError) as e:  # fmt: skip
            raise _CifarFileError(f"{root / f}: not a python-format CIFAR file ({e})") from None
        if (
            data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
            or (labels.shape != (len(data),))
        ):
            raise _CifarFileError(
                f"{root / f}: expected uint8 data of shape (N, 3072) and N labels, got "
                f"{data.dtype} {data.shape} and {labels.shape}"
            )
        if len(labels) and not (labels.min() >= 0 and labels.max() < classes):
            raise _CifarFileError(
                f"{root / f}: labels must lie in 0..{classes - 1}, got "
                f"{labels.min()}..{labels.max()}"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    mean, std = torch.tensor(_CIFAR_MEAN)[:, None, None], torch.tensor(_CIFAR_STD)[:, None, None]
    return (x - mean) / std, torch.from_numpy(np.concatenate(ys)), classes
