"""Models by name: a small BatchNorm ResNet (default), an MLP, CIFAR ResNet-18 and WRN-28-10.

Every factory has the signature ``factory(num_classes, in_shape, **kwargs) -> nn.Module``
and is registered in :data:`MODELS`; :func:`build_model` validates the name.

* ``resnet_small``: 3 stages of one pre-activation-free basic block each (widths
  ``width, 2*width, 4*width``), BatchNorm; 1D convolutions for ``in_shape=(C, L)``, 2D for
  ``(C, H, W)``. About 75k parameters at ``width=16``.
* ``mlp``: flatten, ``depth`` hidden ReLU layers of ``width`` units.
* ``resnet18``: the CIFAR ResNet-18 of the SAF/SAM papers (3x3 stem, no max-pool).
* ``wrn28_10``: Wide-ResNet-28-10 (Zagoruyko & Komodakis 2016), as in the SAF paper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from analysis.io import load_budget


def _layers(ndim: int):
    """(Conv, BatchNorm, AdaptiveAvgPool) classes for 1D or 2D inputs."""
    if ndim == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
    raise ValueError(f"convolutional models need in_shape (C, L) or (C, H, W), got {ndim + 1} dims")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, ndim: int = 2):
        super().__init__()
        Conv, BN, _ = _layers(ndim)
        self.conv1 = Conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = BN(c_out)
        self.conv2 = Conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = BN(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv(c_in, c_out, 1, stride, bias=False), BN(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global average pool, linear head."""

    def __init__(self, num_classes, in_shape, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
        super().__init__()
        ndim = len(in_shape) - 1
        Conv, BN, Pool = _layers(ndim)
        self.stem = nn.Sequential(Conv(in_shape[0], widths[0], 3, 1, 1, bias=False), BN(widths[0]))
        layers, c_in = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(c_in, w, 2 if (i > 0 and j == 0) else 1, ndim))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.pool = Pool(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(out), 1))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (BN-ReLU-conv twice), optional dropout."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): ``(depth-4)/6`` blocks per stage."""

    def __init__(self, num_classes, in_shape, depth=28, widen=10, dropout=0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 28), got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_shape[0], widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(c_in, w, 2 if (i > 0 and j == 0) else 1, dropout))
                c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet_small(num_classes: int, in_shape: tuple[int, ...], width: int = 16) -> nn.Module:
    """Small BatchNorm ResNet (widths ``width, 2w, 4w``, one block per stage), 1D or 2D."""
    return ResNet(num_classes, in_shape, widths=(width, 2 * width, 4 * width), blocks=(1, 1, 1))


def mlp(num_classes: int, in_shape: tuple[int, ...], width: int = 128, depth: int = 2) -> nn.Module:
    """Flatten, ``depth`` hidden layers of ``width`` ReLU units, linear head."""
    n_in, layers = int(torch.Size(in_shape).numel()), [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, num_classes))


def resnet18(num_classes: int, in_shape: tuple[int, ...] = (3, 32, 32)) -> nn.Module:
    """CIFAR ResNet-18 (He et al. 2016; 3x3 stem, no max-pool), as in the SAF paper."""
    return ResNet(num_classes, in_shape)


def wrn28_10(num_classes: int, in_shape: tuple[int, ...] = (3, 32, 32), dropout: float = 0.0):
    """Wide-ResNet-28-10, as in the SAF paper's CIFAR experiments."""
    return WideResNet(num_classes, in_shape, depth=28, widen=10, dropout=dropout)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet_small": resnet_small,
    "mlp": mlp,
    "resnet18": resnet18,
    "wrn28_10": wrn28_10,
}


BOUNDS = {"width": (1, 4096), "widen": (1, 64), "depth": (1, 64), "dropout": (0.0, 0.99)}
"""The range of each model option (``width``, ``depth``, ...), checked before a model is
built: a ``run.json`` may hold them."""
MAX_PARAMETERS = 2 * 10**9
"""The most parameters and buffers a named model may have (8 GB of float32; WRN-28-10 has
36.5M); within this, also a quarter of :func:`analysis.load_budget` (weights, gradients and
optimizer state) is the bound."""


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: a key of :data:`MODELS`.
        num_classes: size of the output layer.
        in_shape: shape of one input without the batch dimension, e.g. ``(1, 8, 8)``.
        **kwargs: model options (``width``, ``depth``, ``dropout``).

    Raises:
        ValueError: unknown name or bad options.

    >>> build_model("mlp", 10, (1, 8, 8), width=4)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    for k, v in kwargs.items():  # a file may hold these: bounded before anything is built
        lo, hi = BOUNDS.get(k, (None, None))
        if lo is None:
            continue
        kind = float if k == "dropout" else int
        ok = isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)
        if not ok or not lo <= v <= hi:
            raise ValueError(f"model option {k} must be {kind.__name__} in [{lo}, {hi}], got {v!r}")
    if not (1 <= num_classes <= 100_000 and 1 <= len(in_shape) <= 4
            and all(1 <= d <= 4096 for d in in_shape)):  # fmt: skip
        raise ValueError(f"cannot build for {num_classes} classes of inputs shaped {in_shape}")
    try:
        with torch.device("meta"):  # the size the options imply, before any memory is taken
            probe = MODELS[name](num_classes, tuple(in_shape), **kwargs)
        _check_size(name, probe, kwargs)
        return MODELS[name](num_classes, tuple(in_shape), **kwargs)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"bad options for model {name!r}: {e}") from None


def _check_size(name: str, probe: nn.Module, kwargs: dict) -> None:
    """Refuse a model whose parameters and buffers (float32) exceed a quarter of the load
    budget or :data:`MAX_PARAMETERS`."""
    n = sum(t.numel() for t in [*probe.parameters(), *probe.buffers()])
    limit = min(MAX_PARAMETERS, load_budget() // 16)
    if n > limit:
        raise ValueError(
            f"model options {kwargs} make {name} {n:,} parameters, more than the {limit:,} "
            "this machine's memory budget allows; choose a smaller width or depth"
        )
