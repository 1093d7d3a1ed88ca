r"""Directions in weight space: random filter-normalized, interpolation, PCA, Hessian.

A **direction** is a ``dict[str, torch.Tensor]`` keyed by the model's
``named_parameters()`` names (and, when asked for, its floating-point buffer
names), each tensor shaped like the tensor it perturbs. A key that is absent
is a zero direction for that tensor. The same representation serves as an
**origin** (a point in weight space), so a state dict is an origin.

References:
    Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of
    Neural Nets", NeurIPS 2018 (filter normalization, ``ignore=biasbn``, PCA
    of the optimization path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analysis import HessianOperator, lanczos
from analysis.rng import generator

Direction = dict[str, torch.Tensor]

NORMS = ("filter", "layer", "model", "none")
IGNORES = ("biasbn", None)
_EPS = 1e-10


def _check(norm: str, ignore: str | None) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}; use 'filter' as in Li et al.")
    if ignore not in IGNORES:
        raise ValueError(f"ignore={ignore!r} is not 'biasbn' or None")


def model_weights(model: nn.Module, include_buffers: bool = False) -> Direction:
    """The model's parameters (and floating-point buffers if asked), detached, as a dict.

    Integer buffers (``num_batches_tracked``) are never included: they are not a
    direction in weight space.
    """
    out = {k: p.detach() for k, p in model.named_parameters()}
    if include_buffers:
        out.update({k: b.detach() for k, b in model.named_buffers() if b.is_floating_point()})
    return out


def filter_normalize(
    direction: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    norm: str = "filter",
    ignore: str | None = "biasbn",
) -> Direction:
    r"""Rescale a direction to the scale of the weights, as in Li et al. (2018).

    For ``norm="filter"`` each output filter (conv) or row (linear) ``i`` of a
    tensor of dimension ≥ 2 is rescaled so that

    .. math:: d_i \leftarrow \frac{d_i}{\lVert d_i \rVert} \lVert w_i \rVert ,

    ``"layer"`` does the same per tensor, ``"model"`` once for the whole
    vector, ``"none"`` leaves the direction as it is. Tensors of dimension ≤ 1
    (biases, BatchNorm) are zeroed when ``ignore="biasbn"``; otherwise they are
    set to ``w`` (Li et al.) for ``filter``/``layer``, are scaled with the rest
    for ``model`` and left as they are for ``none``. A zero filter stays zero
    (never NaN).

    Args:
        direction: name -> tensor, same shapes as ``weights``.
        weights: name -> tensor, the point the direction starts from.
        norm: ``"filter"``, ``"layer"``, ``"model"`` or ``"none"``.
        ignore: ``"biasbn"`` or ``None``.

    Returns:
        A new direction; the inputs are not modified.

    Example:
        >>> d = {"w": torch.tensor([[3.0, 4.0], [1.0, 0.0]]), "b": torch.ones(2)}
        >>> w = {"w": torch.tensor([[0.0, 1.0], [0.0, 2.0]]), "b": torch.ones(2)}
        >>> filter_normalize(d, w)["w"]
        tensor([[0.6000, 0.8000],
                [2.0000, 0.0000]])
        >>> filter_normalize(d, w)["b"]
        tensor([0., 0.])
    """
    _check(norm, ignore)
    out: Direction = {}
    for k, d in direction.items():
        if k not in weights or weights[k].shape != d.shape:
            raise ValueError(f"direction tensor {k!r} has no weight of the same shape to scale to")
        w = weights[k].to(d.dtype)
        if d.dim() <= 1 and ignore == "biasbn":
            out[k] = torch.zeros_like(d)
        elif d.dim() <= 1 and norm in ("filter", "layer"):
            out[k] = w.clone()
        elif norm == "filter":
            dn = d.flatten(1).norm(dim=1).view(-1, *[1] * (d.dim() - 1))
            wn = w.flatten(1).norm(dim=1).view_as(dn)
            out[k] = d * (wn / (dn + _EPS))
        elif norm == "layer":
            out[k] = d * (w.norm() / (d.norm() + _EPS))
        else:
            out[k] = d.clone()
    if norm == "model":
        scaled = [k for k in out if not (out[k].dim() <= 1 and ignore == "biasbn")]
        dn = torch.sqrt(sum((out[k].double() ** 2).sum() for k in scaled) or torch.zeros(()))
        wn = torch.sqrt(sum((weights[k].double() ** 2).sum() for k in scaled) or torch.zeros(()))
        for k in scaled:
            out[k] = out[k] * (wn / (dn + _EPS)).to(out[k].dtype)
    return out


def random_direction(
    model: nn.Module,
    norm: str = "filter",
    ignore: str | None = "biasbn",
    seed: int = 0,
    include_buffers: bool = False,
    index: int = 0,
) -> Direction:
    r"""A Gaussian direction, filter-normalized (Li et al. 2018, Sec. 4).

    :math:`d \sim \mathcal N(0, I)` drawn on the CPU from the stream ``(seed, index)``
    (:func:`analysis.rng.generator`: the same on every device, and independent of every
    other seed's and index's), then
    :func:`filter_normalize` d to the model's weights: with the defaults
    :math:`\lVert d_i\rVert = \lVert w_i\rVert` for every output filter (row
    of a linear layer), and biases / BatchNorm parameters are zero.

    Args:
        model: the network; its weights are read, never changed.
        norm: ``"filter"``, ``"layer"``, ``"model"`` or ``"none"``.
        ignore: ``"biasbn"`` (zero 1-D tensors) or ``None`` (set them to ``w``).
        seed: seed of the Gaussian draw.
        index: which direction of that seed (a 2D surface uses 0 and 1).
        include_buffers: also perturb floating-point buffers (BN running stats),
            which follow the same rule as 1-D parameters. Default: untouched.

    Returns:
        A direction (name -> tensor on the parameter's device and dtype).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> d = random_direction(lin, seed=0)
        >>> torch.allclose(d["weight"].norm(dim=1), lin.weight.norm(dim=1))
        True
        >>> d["bias"].abs().sum().item()
        0.0
    """
    _check(norm, ignore)
    weights = model_weights(model, include_buffers)
    gen = generator(seed, "direction", index)
    raw = {
        k: torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.device, w.dtype)
        for k, w in weights.items()
    }
    return filter_normalize(raw, weights, norm, ignore)


def interpolation_directions(
    start: Mapping[str, torch.Tensor],
    *ends: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None = None,
) -> list[Direction]:
    r"""Directions from a start point to one or two other checkpoints.

    With two checkpoints the line :math:`\theta(\alpha) = \theta_0 +
    \alpha(\theta_1 - \theta_0)` passes through :math:`\theta_0` at
    :math:`\alpha=0` and :math:`\theta_1` at :math:`\alpha=1`; with three the
    plane :math:`\theta_0 + \alpha(\theta_1-\theta_0) + \beta(\theta_2-\theta_0)`
    passes through all of them at (0,0), (1,0) and (0,1). Evaluate with
    ``origin=start``. Floating-point buffers (BN running stats) are
    interpolated too, so the end points reproduce each checkpoint exactly.

    Args:
        start: state dict of the first checkpoint.
        *ends: one or two more state dicts with the same keys.
        keys: the names to interpolate; default every floating-point tensor of ``start``.

    Returns:
        One direction per end point.

    Example:
        >>> a, b = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 2.0])}
        >>> interpolation_directions(a, b)[0]["w"]
        tensor([1., 2.])
    """
    if not 1 <= len(ends) <= 2:
        raise ValueError(f"give 2 or 3 checkpoints to interpolate, got {1 + len(ends)}")
    keys = [k for k, v in start.items() if v.is_floating_point()] if keys is None else keys
    out = []
    for e in ends:
        missing = [k for k in keys if k not in e or e[k].shape != start[k].shape]
        if missing:
            raise ValueError(f"checkpoints differ in tensor {missing[0]!r}: same architecture?")
        out.append({k: (e[k].to(start[k]) - start[k]) for k in keys})
    return out


@dataclass
class PCAResult:
    """PCA of a trajectory of checkpoints (Li et al. 2018, Sec. 7).

    Attributes:
        directions: orthonormal directions (unit norm over the included tensors).
        origin: the point the plane passes through (the final checkpoint by default).
        explained_variance_ratio: share of the trajectory's squared spread per direction.
        coords: ``(n_checkpoints, n_components)`` exact least-squares coordinates of
            each checkpoint in the plane, ``coords[i] = V^T (w_i - origin)``.
        residuals: distance of each checkpoint from the plane (0 when it lies in it).
    """

    directions: list[Direction]
    origin: Direction
    explained_variance_ratio: np.ndarray
    coords: np.ndarray
    residuals: np.ndarray


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def pca_directions(
    trajectory: Sequence[Mapping[str, torch.Tensor]],
    keys: Sequence[str],
    n_components: int = 2,
    origin: Mapping[str, torch.Tensor] | None = None,
    center: str = "origin",
) -> PCAResult:
    r"""Principal directions of a checkpoint trajectory, and its exact projection.

    With :math:`A` the matrix whose rows are :math:`w_i - c` (``c`` the origin,
    or the trajectory mean when ``center="mean"`` as sklearn's PCA in Li et al.),
    the directions are the top right singular vectors of :math:`A`, computed
    from the small Gram matrix :math:`AA^\top` in float64 (no
    ``n_checkpoints × n_params`` copy). Each checkpoint's coordinates are the
    least-squares solution :math:`V^\top(w_i - o)` (exact, since :math:`V` is
    orthonormal), and its residual is :math:`\lVert (I - VV^\top)(w_i-o)\rVert`.

    Args:
        trajectory: state dicts in training order.
        keys: tensor names to use, e.g. the ≥ 2-D parameters (Li et al. leave
            biases and BN out with ``ignore=biasbn``).
        n_components: number of directions (1 or 2 for plots).
        origin: the plane's base point; default the last checkpoint.
        center: ``"origin"`` (best plane through the origin) or ``"mean"``.

    Returns:
        A :class:`PCAResult`.
    """
    if center not in ("origin", "mean"):
        raise ValueError(f"center={center!r}: use 'origin' or 'mean'")
    if not keys:
        raise ValueError("no tensors to run PCA on: give keys (parameter names)")
    if len(trajectory) < n_components + 1 or n_components < 1:
        raise ValueError(
            f"PCA with {n_components} components needs at least {n_components + 1} "
            f"checkpoints, got {len(trajectory)}"
        )
    o = {k: (trajectory[-1] if origin is None else origin)[k].double() for k in keys}
    c = {k: sum(t[k].double() for t in trajectory) / len(trajectory) for k in keys}
    c = o if center == "origin" else c
    rows = [{k: t[k].double() - c[k] for k in keys} for t in trajectory]
    G = torch.tensor([[_dot(a, b) for b in rows] for a in rows], dtype=torch.float64)
    evals, U = torch.linalg.eigh(G)
    evals, U = evals.flip(0).clamp_min(0), U.flip(1)
    if evals[n_components - 1] <= 1e-12 * max(float(evals[0]), 1e-300):
        raise ValueError("the trajectory spans fewer directions than n_components")
    dirs = []
    for j in range(n_components):
        s = float(evals[j].sqrt())
        d = {k: sum(float(U[i, j]) * rows[i][k] for i in range(len(rows))) / s for k in keys}
        dirs.append(d)
    deltas = [{k: t[k].double() - o[k] for k in keys} for t in trajectory]
    coords = np.array([[_dot(d, v) for v in dirs] for d in deltas])
    norms2 = np.array([_dot(d, d) for d in deltas])
    residuals = np.sqrt(np.clip(norms2 - (coords**2).sum(1), 0, None))
    dtype = trajectory[-1][keys[0]].dtype
    return PCAResult(
        directions=[{k: v.to(dtype) for k, v in d.items()} for d in dirs],
        origin={k: v.to(dtype) for k, v in o.items()},
        explained_variance_ratio=(evals[:n_components] / evals.sum()).numpy(),
        coords=coords,
        residuals=residuals,
    )


def hessian_directions(
    model: nn.Module,
    loss_fn,
    data,
    k: int = 2,
    params=None,
    **kwargs,
) -> tuple[list[Direction], np.ndarray]:
    r"""The top-``k`` Hessian eigenvectors :math:`H v = \lambda v` as directions.

    Lanczos on exact Hessian-vector products (:class:`analysis.HessianOperator`,
    eval mode); the model is not modified.

    Args:
        model, loss_fn, data: as for :func:`landscape.surface_2d`.
        k: number of eigenvectors.
        params: which parameters (see :class:`analysis.HessianOperator`); default
            all trainable ones. The other tensors get no direction.
        **kwargs: ``tol``, ``max_iter``, ``seed``, ``progress`` go to
            :func:`analysis.lanczos`; the rest to :class:`analysis.HessianOperator`.

    Returns:
        ``(directions, eigenvalues)``, largest eigenvalue first; each direction
        has unit norm over the chosen parameters (the sign is arbitrary).
    """
    solver = {n: kwargs.pop(n) for n in ("tol", "max_iter", "seed", "progress") if n in kwargs}
    H = HessianOperator(model, loss_fn, data, params, **kwargs)
    res = lanczos(H, k, which="largest", **solver)
    dtypes = dict(model.named_parameters())
    dirs = []
    for v in res.vectors:
        d = H.space.unflatten(v.detach())
        dirs.append({n: t.to(dtypes[n].dtype).clone() for n, t in d.items()})
    return dirs, res.values.detach().cpu().double().numpy()
