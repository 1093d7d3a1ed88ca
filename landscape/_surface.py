r"""1D and 2D loss surfaces: evaluated with functional_call, resumable, distributed.

A surface point is

.. math::
    L(\alpha, \beta) = \frac{1}{N}\sum_{(x, y)}
    \ell\big(f(x;\, o + \alpha d_1 + \beta d_2), y\big)

over every batch of ``data`` (batch losses weighted by batch size), with the
model in eval mode (Li et al. 2018), stored with its standard error
:math:`\mathrm{SE} = s/\sqrt N`, :math:`s^2 = \frac{1}{N-1}\sum_i (\ell_i - L)^2`
over the per-sample losses :math:`\ell_i` (:func:`analysis.batches.sample_losses`),
the error of :math:`L` as an estimate of the loss on the distribution the ``N``
samples were drawn from. The model itself is never copied nor
modified: each point is one :func:`torch.func.functional_call` with the
perturbed tensors, so the model's state is bit-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from analysis import batches as B
from analysis.distributed import all_reduce_sum, barrier, rank_world
from analysis.fold import prefold_batchnorm
from analysis.io import atomic_write_json, atomic_write_with, load_budget

FORMAT = "saf-surface/1"
FIELDS = ("loss", "accuracy", "loss_se", "samples")  # the values stored per grid point


@dataclass
class Surface:
    """A 1D or 2D loss surface.

    Attributes:
        coords: ``[xs]`` or ``[xs, ys]``, the grid along each direction.
        loss: shape ``(len(xs),)`` or ``(len(xs), len(ys))``; ``loss[i, j]`` is at
            ``(xs[i], ys[j])`` ("ij" indexing: transpose it for ``plt.contour``).
        accuracy: same shape; NaN where the outputs are not class scores.
        done: which points have been evaluated (all of them once complete).
        metadata: settings and provenance (JSON-serialisable).
        loss_se: same shape, the standard error of each point's mean loss over the
            samples (module docstring); NaN where the loss has no per-sample form.
        samples: same shape, the samples each point was evaluated on (fewer than all
            with ``target_se``); NaN where unknown.
    """

    coords: list[np.ndarray]
    loss: np.ndarray
    accuracy: np.ndarray
    done: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    loss_se: np.ndarray | None = None
    samples: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.coords = [np.asarray(c, dtype=float) for c in self.coords]
        if self.done is None:
            self.done = np.ones(self.loss.shape, dtype=bool)
        if self.loss_se is None:
            self.loss_se = np.full(np.shape(self.loss), np.nan)
        if self.samples is None:
            self.samples = np.full(np.shape(self.loss), np.nan)

    @property
    def dim(self) -> int:
        """1 or 2."""
        return len(self.coords)

    @property
    def complete(self) -> bool:
        """True when every grid point has been evaluated."""
        return bool(self.done.all())

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz``, metadata inside) and ``path.json``, each atomically."""
        path = Path(path)
        meta = {**self.metadata, "format": FORMAT, "complete": self.complete}
        arrays = {f"coords{i}": c for i, c in enumerate(self.coords)}
        arrays.update(loss=self.loss, accuracy=self.accuracy, done=self.done)
        arrays.update(loss_se=self.loss_se, samples=self.samples)
        arrays["metadata"] = np.array(json.dumps(meta, sort_keys=True))
        atomic_write_with(path, lambda f: np.savez(f, **arrays))
        atomic_write_json(path.with_suffix(".json"), _json_view(self, meta))
        return path

    @classmethod
    def load(
        cls, path: str | Path, fingerprint: str | None = None, shape: Sequence[int] | None = None
    ) -> Surface:
        """Read a surface written by :meth:`save` (no pickles are loaded).

        Every array's size, as its ``.npy`` header declares it, is checked before any is
        inflated (within :func:`analysis.io.load_budget`; with ``shape``, the grid's shape),
        and ``fingerprint`` against the metadata before the values are read.

        Raises:
            ValueError: not a surface file, arrays over the budget or of another shape, or
                another fingerprint.
        """
        _check_npz(Path(path), shape)
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["metadata"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a surface file (format {meta.get('format')!r})")
            if fingerprint is not None and meta.get("fingerprint") != fingerprint:
                raise ValueError(f"{path}: a surface of other directions or settings")
            coords = [z[f"coords{i}"] for i in range(sum(k.startswith("coords") for k in z))]
            done = z["done"].astype(bool)
            # loss_se and samples are None in files written before them
            return cls(coords, z["loss"], z["accuracy"], done, meta, z.get("loss_se"),
                       z.get("samples"))  # fmt: skip


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}  # fmt: skip
_MAX_METADATA = 2**24  # 16 MiB of JSON text


def _check_npz(path: Path, shape: Sequence[int] | None) -> None:
    """Refuse an ``.npz`` whose arrays, as their ``.npy`` headers declare them (only the
    headers are inflated), exceed the load budget, or (with ``shape``) do not fit the grid."""
    want = None if shape is None else tuple(shape)
    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    dims, _, dtype = _NPY_HEADERS[version](f)
                n = math.prod(dims) * dtype.itemsize
                name = info.filename.removesuffix(".npy")
                grid = None if want is None else want if name in (*FIELDS, "done") else None
                if name.startswith("coords") and want is not None:
                    i = name.removeprefix("coords")
                    grid = (want[int(i)],) if i.isdigit() and int(i) < len(want) else ()
                if (grid is not None and dims != grid) or (
                    name == "metadata" and n > _MAX_METADATA
                ):
                    raise ValueError(f"{name} is shaped {dims}")
                total += n
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a surface file of this grid ({str(e)[:80]})") from None
    if total > load_budget():
        raise ValueError(f"{path}: its arrays declare {total / 2**20:.1f} MiB, more than the "
                         f"load budget (analysis.io.load_budget)")  # fmt: skip


def _json_view(s: Surface, meta: dict) -> dict:
    tolist = lambda a: [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]  # noqa: E731
    return {
        "metadata": meta,
        "shape": list(s.loss.shape),
        "coords": [c.tolist() for c in s.coords],
        "loss": tolist(s.loss),
        "accuracy": tolist(s.accuracy),
        "loss_se": tolist(s.loss_se),
        "samples": tolist(s.samples),
    }


def make_point_evaluator(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Iterable,
    directions: Sequence[Mapping[str, torch.Tensor]],
    origin: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    fast: bool = True,
    forward_fn: Callable | None = None,
    output_fn: Callable | None = None,
    target_se: float | None = None,
) -> Callable[[Sequence[float]], tuple[float, float, float, int]]:
    r"""``f(coeffs) -> (loss, accuracy, loss_se, samples)`` at :math:`o + \sum_j c_j d_j`.

    ``loss_se`` is the standard error of the mean loss over the samples (module
    docstring), NaN where the loss has no per-sample form; ``samples`` is how many
    samples of ``data`` the point used: all of them, unless ``target_se`` is given.

    With ``target_se``, the samples are put in class-interleaved order (every prefix is
    class-balanced to one sample per class, when the targets are class labels) and re-cut
    into batches of the first batch's size; a point is evaluated on the first 2, 4, 8, ...
    batches until its ``loss_se`` is at most ``target_se`` (or the data run out), and its
    loss is the mean over those samples, an estimate of the full-data loss with that
    standard error. Flat, low-loss regions then cost a fraction of a full pass. Every point
    starts from the same samples, so the errors of nearby points move together: the
    surface's shape is steadier than its level.

    Args:
        model: any module; never modified (tensors are swapped in by functional_call).
        loss_fn: ``loss_fn(outputs, targets)``, mean over the batch.
        data: re-iterable batches ``(inputs, targets)`` (a list or a DataLoader).
        directions: one direction per coordinate.
        origin: base point (name -> tensor, e.g. a state dict); default the model's own.
        device: where to evaluate; default the model's device. The model is not moved.
        fast: fold BatchNorm into convolutions (exact up to float rounding; once for
            the whole grid where the directions leave the BatchNorm alone), feed image
            batches channels-last when something was folded, and run under
            ``torch.inference_mode`` (with ``forward_fn`` the model runs as it is).
        forward_fn, output_fn: hooks for models outside the batch convention
            (:class:`analysis.batches.Call`).
        target_se: the standard error each point is evaluated to (``data`` must then be
            a list of batches).
    """
    if iter(data) is data:
        raise ValueError("data is a one-shot iterator; pass a list of batches or a DataLoader")
    if target_se is not None:
        if not (target_se > 0 and math.isfinite(target_se)):
            raise ValueError(f"target_se must be a finite number > 0, got {target_se}")
        if not isinstance(data, Sequence) or not data:
            raise ValueError("target_se needs data as a non-empty list of batches")
        data = _interleaved(data)
    device, base, dirs = _placed(model, directions, origin, device)
    # Entries that are exactly zero (ignored biases and BatchNorm, by default) move nothing.
    keys = sorted(k for k in set().union(*dirs) if any(k in d and bool(d[k].any()) for d in dirs))
    call, net = B.Call(forward_fn, output_fn), model
    if fast and call.forward_fn is None:
        net, base, dirs, _ = prefold_batchnorm(model, base, dirs, set(keys))
    own = dict([*net.named_parameters(), *net.named_buffers()])
    keys = [k for k in keys if k in own]  # a traced module drops submodules it never calls
    # Tensors the module already holds need not be swapped in at every point.
    fixed = {
        k: v for k, v in base.items() if k in own and k not in keys and not _same_tensor(v, own[k])
    }
    move = _mover([base[k] for k in keys], [[d.get(k) for k in keys] for d in dirs])
    channels_last = fast and net is not model

    def prep(batch):
        x, y = B.split(batch)
        return _channels_last(B.to(x, device), channels_last), B.to(y, device)

    cached = [prep(b) for b in data] if isinstance(data, Sequence) else None

    def point(coeffs: Sequence[float]) -> tuple[float, float, float, int]:
        params = {**fixed, **dict(zip(keys, move(coeffs), strict=True))}
        count = [0]

        def moments(batch):  # [loss, accuracy, mean of the squared per-sample losses]
            out, y = call(net, batch, params), batch[1]
            la = B.loss_and_accuracy(loss_fn, out, y)
            per = B.sample_losses(loss_fn, out, y, la[0])
            if per is None and target_se is not None:
                raise ValueError("target_se needs a loss that is a mean of per-sample losses")
            count[0] += B.batch_size(batch, loss_fn)
            m2 = (per**2).mean() if per is not None else torch.tensor(float("nan"))
            return torch.cat([la, m2.to(la).reshape(1)])

        def stage(batches) -> tuple[int, list[float]]:
            before = count[0]
            means = B.batch_mean(moments, batches, loss_fn=loss_fn).tolist()
            return count[0] - before, means

        ctx = torch.inference_mode() if fast else torch.no_grad()
        with B.model_mode(model, "eval"), ctx:
            if target_se is None:  # one pass over all of the data
                batches = cached if cached is not None else (prep(b) for b in data)
                return (*_summary([stage(batches)]), count[0])
            stages, start = [], 0
            for stop in _stage_ends(len(cached)):
                stages.append(stage(cached[start:stop]))
                start = stop
                loss, acc, se = _summary(stages)
                if se <= target_se:
                    break
            return loss, acc, se, count[0]

    return point


def _summary(stages: list[tuple[int, list[float]]]) -> tuple[float, float, float]:
    """``(loss, accuracy, loss_se)`` over stages of batches (one stage: its own means)."""
    n = sum(k for k, _ in stages)
    if len(stages) == 1:
        loss, acc, m2 = stages[0][1]
    else:
        loss, acc, m2 = (math.fsum(k * v[i] for k, v in stages) / n for i in range(3))
    se = (max(m2 - loss * loss, 0.0) / (n - 1)) ** 0.5 if n > 1 else math.nan
    return loss, acc, se


def _stage_ends(n_batches: int) -> list[int]:
    """2, 4, 8, ... batches, then all of them."""
    ends, k = [], 2
    while k < n_batches:
        ends.append(k)
        k *= 2
    return [*ends, n_batches]


def _interleaved(data: Sequence) -> list:
    """The samples of ``data`` re-cut into batches of its first batch's size, in
    class-interleaved order when the targets are class labels (every prefix is then
    class-balanced to within one sample per class; data order within a class)."""
    xs, ys = zip(*(B.split(b) for b in data), strict=True)
    X, Y = B.concat(list(xs)), B.concat(list(ys))
    size, n = B.batch_size(data[0]), B.batch_size((X, Y))
    order = torch.arange(n)
    if isinstance(Y, torch.Tensor) and Y.dim() == 1 and not Y.is_floating_point():
        labels = Y.cpu()
        rank = torch.zeros_like(labels)  # the sample's position within its class
        for c in labels.unique():
            rows = labels.eq(c)
            rank[rows] = torch.arange(int(rows.sum()))
        order = torch.argsort(rank * (int(labels.max()) + 1) + labels - labels.min(), stable=True)
    cut = [order[i : i + size] for i in range(0, n, size)]
    return [(B.take(X, rows), B.take(Y, rows)) for rows in cut]


def _placed(model, directions, origin, device) -> tuple[torch.device, dict, list[dict]]:
    """(device, origin tensors, direction tensors), all on the evaluation device, checked."""
    first = next(iter(model.parameters()), None)
    device = (
        torch.device(device)
        if device is not None
        else (first.device if first is not None else torch.device("cpu"))
    )
    # Every tensor (non-persistent buffers too), so evaluation on another device works.
    state = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    if origin is not None:
        unknown = [k for k in origin if k not in state]
        if unknown:
            raise ValueError(f"origin has tensor {unknown[0]!r} that the model does not have")
        state.update({k: v.detach().to(state[k].dtype) for k, v in origin.items()})
    base = {k: v.to(device) for k, v in state.items()}
    dirs = [{k: v.detach().to(device, base[k].dtype) for k, v in d.items()} for d in directions]
    for d in dirs:
        bad = [k for k in d if k not in base or d[k].shape != base[k].shape]
        if bad:
            raise ValueError(f"direction tensor {bad[0]!r} does not match the model's shapes")
    return device, base, dirs


def _mover(origin: list[torch.Tensor], steps: list[list[torch.Tensor | None]]) -> Callable:
    r"""``move(c) -> [o_i + \sum_j c_j d_{j,i}]``: one fused kernel per non-zero coordinate."""
    steps = [
        [torch.zeros_like(o) if t is None else t for o, t in zip(origin, s, strict=True)]
        for s in steps
    ]

    def move(coeffs: Sequence[float]) -> list[torch.Tensor]:
        if len(coeffs) != len(steps):
            raise ValueError(f"expected {len(steps)} coordinates, got {len(coeffs)}")
        vals = origin
        for c, step in zip(coeffs, steps, strict=True):
            if c != 0 and origin:
                if vals is origin:  # never write into the origin's tensors
                    vals = torch._foreach_add(vals, step, alpha=float(c))
                else:
                    torch._foreach_add_(vals, step, alpha=float(c))
        return vals

    return move


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _channels_last(x: Any, on: bool) -> Any:
    """4-D floating input tensors in channels-last order (what folded convolutions prefer)."""
    if on and isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _digest(tensors: Mapping[str, torch.Tensor] | None, h) -> None:
    for k in sorted(tensors or {}):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint(coords, directions, origin, extra: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of the grid, the directions, the origin and ``extra`` settings (resume key)."""
    h = hashlib.sha256()
    for c in coords:
        h.update(np.asarray(c, dtype=np.float64).tobytes())
    for d in directions:
        _digest(d, h)
    _digest(origin, h)
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _load_partials(path: Path | None, fp: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(values, done)``: loss, accuracy, loss_se and samples stacked, from ``path`` and its
    partials."""
    vals = np.full((len(FIELDS), *shape), np.nan)
    done = np.zeros(shape, dtype=bool)
    if path is None:
        return vals, done
    for p in [path, *sorted(path.parent.glob(path.name + ".rank*.npz"))]:
        if not p.is_file():
            continue
        try:  # fingerprint and sizes first: a planted file inflates nothing
            s = Surface.load(p, fp, shape)
        except Exception:  # unreadable, oversized or another surface: recompute its points
            continue
        if s.loss.shape != tuple(shape):
            continue
        new = s.done & ~done
        for v, a in zip(vals, (getattr(s, f) for f in FIELDS), strict=True):
            v[new] = a[new]
        done[new] = True
    return vals, done


def evaluate_grid(
    point: Callable[[Sequence[float]], tuple[float, ...]],
    coords: Sequence[Sequence[float]],
    path: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    fp: str | None = None,
    save_every: int = 10,
    progress: bool = True,
    distributed: bool | None = None,
) -> Surface:
    """Evaluate ``point`` on the grid ``coords``, resuming from ``path`` and sharing across ranks.

    ``point(coeffs)`` returns ``(loss, accuracy)``, optionally followed by ``loss_se`` and
    ``samples`` (:func:`make_point_evaluator`). Points already saved under ``path`` (or its
    per-rank partial files) with the same fingerprint are not recomputed. Partial
    progress is saved atomically every ``save_every`` points. Under
    ``torch.distributed`` the missing points are dealt round-robin to the ranks and
    gathered with one all-reduce; rank 0 writes the final file.
    """
    coords = [np.asarray(c, dtype=float) for c in coords]
    shape = tuple(len(c) for c in coords)
    rank, world = rank_world(distributed)
    path = Path(path) if path is not None else None
    fp = fp or fingerprint(coords, [], None, dict(metadata or {}))
    meta = {**(metadata or {}), "fingerprint": fp, "dim": len(shape)}
    vals, done = _load_partials(path, fp, shape)
    todo = np.flatnonzero(~done.ravel())
    mine = todo[rank::world]
    part = path if world == 1 else (path and path.with_name(f"{path.name}.rank{rank}.npz"))
    new = np.zeros((len(FIELDS) + 1, done.size))  # this rank's new values, then done
    flat_vals = vals.reshape(len(FIELDS), -1)
    t0 = time.perf_counter()
    bar = tqdm(mine, desc="surface", disable=not progress or rank != 0, leave=False)
    for count, flat in enumerate(bar, 1):
        idx = np.unravel_index(flat, shape)
        out = tuple(point([float(c[i]) for c, i in zip(coords, idx, strict=True)]))
        out = (*out, *[math.nan] * (len(FIELDS) - len(out)))
        new[:, flat] = (*out, 1.0)
        flat_vals[:, flat] = out
        done.flat[flat] = True
        if part is not None and count % save_every == 0 and count < len(mine):
            _surface(coords, vals, done, meta).save(part)
    if world > 1:
        vals, done = _gather(vals, done, new, shape)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    meta["evaluated_points"] = int(len(todo))
    s = _surface(coords, vals, done, meta)
    if path is not None and rank == 0:
        s.save(path)
        for p in path.parent.glob(path.name + ".rank*.npz"):
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
    barrier(world > 1)
    return s


def _surface(coords, vals, done, meta) -> Surface:
    loss, accuracy, loss_se, samples = vals
    return Surface(coords, loss, accuracy, done, meta, loss_se, samples)


def _gather(vals, done, new, shape):
    """Every rank's new points, summed over ranks (each point is computed by one rank)."""
    t = all_reduce_sum(torch.tensor(new, dtype=torch.float64), True).numpy()
    k = len(FIELDS)
    mask = t[k].reshape(shape) > 0.5
    return np.where(mask, t[:k].reshape(k, *shape), vals), done | mask


def _grid_meta(directions, origin, extra) -> dict[str, Any]:
    norms = [
        float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))) for d in directions
    ]
    return {"direction_norms": norms, "custom_origin": origin is not None, **(extra or {})}


def surface(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    directions: Sequence[Mapping[str, torch.Tensor]],
    coords: Sequence[Sequence[float]],
    *,
    origin: Mapping[str, torch.Tensor] | None = None,
    path: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    fast: bool = True,
    save_every: int = 10,
    progress: bool = True,
    distributed: bool | None = None,
    forward_fn: Callable | None = None,
    output_fn: Callable | None = None,
    target_se: float | None = None,
) -> Surface:
    r"""Loss and accuracy on the grid :math:`o + \sum_j c_j d_j`, one axis per direction.

    Args:
        model: any ``nn.Module``; evaluated in eval mode, never copied nor modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean.
        data: re-iterable ``(inputs, targets)`` batches (list or DataLoader), in the
            :mod:`analysis.batches` convention.
        directions: one direction per axis (1 or 2), e.g. from
            :func:`landscape.random_direction`.
        coords: the grid coordinates along each direction.
        origin: base point (e.g. a state dict); default the model's current tensors.
        path: ``.npz`` file to save to and resume from (same settings only:
            grid, directions, origin and ``metadata`` form the resume key).
        metadata: extra JSON-serialisable settings stored with the surface.
        device: where to evaluate (default the model's device).
        fast: BatchNorm folding and inference mode (exact up to float rounding).
        save_every: save partial progress every this many points.
        progress: show a tqdm bar on stderr.
        distributed: split points across ``torch.distributed`` ranks (default:
            when initialized).
        forward_fn, output_fn: hooks for models outside the batch convention
            (:class:`analysis.batches.Call`).
        target_se: evaluate each point on class-balanced prefixes of the data, growing,
            until its standard error is at most this (see :func:`make_point_evaluator`);
            ``Surface.samples`` records how many each point used.

    Returns:
        A :class:`Surface` with ``loss[i, j]`` at ``(coords[0][i], coords[1][j])``.
    """
    if len(directions) != len(coords) or len(coords) not in (1, 2):
        raise ValueError(
            f"give one direction per grid axis (1 or 2), got {len(directions)} directions "
            f"and {len(coords)} axes"
        )
    coords = [np.asarray(c, dtype=float).ravel() for c in coords]
    for c in coords:
        if c.size == 0 or not np.isfinite(c).all():
            raise ValueError("grid coordinates must be a non-empty list of finite numbers")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    point = make_point_evaluator(
        model, loss_fn, data, directions, origin, device, fast, forward_fn, output_fn, target_se
    )
    extra = {**(metadata or {}), **({"target_se": target_se} if target_se is not None else {})}
    meta = _grid_meta(directions, origin, extra)
    fp = fingerprint(coords, directions, origin, extra)
    return evaluate_grid(point, coords, path, meta, fp, save_every, progress, distributed)


def surface_1d(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    direction: Mapping[str, torch.Tensor],
    coords: Sequence[float],
    **options: Any,
) -> Surface:
    r"""Loss and accuracy along :math:`o + \alpha d` for each :math:`\alpha` in ``coords``.

    ``options`` are those of :func:`surface`. With an interpolation direction
    (:func:`landscape.interpolation_directions`) and ``origin=start``,
    :math:`\alpha = 0` and :math:`\alpha = 1` are the two checkpoints.

    Example:
        >>> lin = torch.nn.Linear(1, 1, bias=False)
        >>> _ = lin.weight.data.fill_(0.0)
        >>> data = [(torch.ones(4, 1), torch.zeros(4, 1))]
        >>> s = surface_1d(lin, torch.nn.functional.mse_loss, data,
        ...                {"weight": torch.ones(1, 1)}, [-1, 0, 2], progress=False)
        >>> s.loss.tolist()
        [1.0, 0.0, 4.0]
    """
    return surface(model, loss_fn, data, [direction], [coords], **options)


def surface_2d(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    directions: Sequence[Mapping[str, torch.Tensor]],
    xs: Sequence[float],
    ys: Sequence[float],
    **options: Any,
) -> Surface:
    r"""Loss and accuracy on the plane :math:`o + \alpha d_1 + \beta d_2` (Li et al. 2018).

    ``options`` are those of :func:`surface`; ``loss[i, j]`` is at ``(xs[i], ys[j])``.
    """
    if len(directions) != 2:
        raise ValueError(f"surface_2d needs 2 directions, got {len(directions)}")
    return surface(model, loss_fn, data, list(directions), [xs, ys], **options)
