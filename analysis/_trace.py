r"""Stochastic trace estimators on any symmetric matvec: Hutchinson and Hutch++."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from analysis._functional import LossFn, ParamSpec
from analysis._hvp import HessianOperator
from analysis._linop import as_matvec, random_vector
from analysis.memory import fits
from analysis.rng import generator


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        value: the estimate of :math:`\\mathrm{tr}(H)`.
        stderr: its standard error (from the spread of the random quadratic forms).
        n_matvecs: products used.
    """

    value: float
    stderr: float
    n_matvecs: int


def hutchinson(
    op: Any, n_samples: int = 100, *, n: int | None = None, seed: int = 0, progress: bool = False
) -> TraceResult:
    r"""Hutchinson's estimator :math:`\mathrm{tr}(H) \approx \frac1m \sum_i z_i^\top H z_i`.

    :math:`z_i` are Rademacher vectors; the variance is :math:`2\|H\|_F^2 - 2\sum_i H_{ii}^2`
    per sample.

    Reference: Hutchinson, "A stochastic estimator of the trace...", 1989.

    >>> r = hutchinson(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)), 4)
    >>> r.value  # exact for a diagonal matrix
    3.0
    """
    matvec, n, dtype, device = as_matvec(op, n)
    _positive(n_samples, "n_samples")
    vals, gen = [], generator(seed, "trace")
    for _ in tqdm(range(n_samples), desc="hutchinson", disable=not progress, leave=False):
        z = random_vector(n, gen, dtype, device, "rademacher")
        vals.append(float(z @ matvec(z).to(dtype)))
    return TraceResult(_mean(vals), _stderr(vals), n_samples)


def hutchpp(
    op: Any, n_matvecs: int = 99, *, n: int | None = None, seed: int = 0, progress: bool = False
) -> TraceResult:
    r"""Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest.

    With :math:`m` products: :math:`Q = \mathrm{qr}(HS)` for :math:`m/3` Rademacher
    columns :math:`S`, then

    .. math:: \mathrm{tr}(H) \approx \mathrm{tr}(Q^\top H Q)
              + \tfrac{3}{m}\,\mathrm{tr}(G^\top (I-QQ^\top) H (I-QQ^\top) G).

    The standard error is that of the second (random) term. Exact when
    :math:`\mathrm{rank}(H) \le m/3`.

    Reference: Meyer, Musco, Musco, Woodruff, "Hutch++", SOSA 2021.
    """
    matvec, n, dtype, device = as_matvec(op, n)
    if n_matvecs < 3:
        raise ValueError(f"hutchpp needs n_matvecs >= 3, got {n_matvecs}")
    s = n_matvecs // 3
    itemsize = torch.empty((), dtype=dtype).element_size()
    fits(2 * s * n * itemsize, f"Hutch++'s sketch ({s} x {n})", device, hint="use fewer matvecs")
    bar = tqdm(total=3 * s, desc="hutch++", disable=not progress, leave=False)

    def mv(v):
        bar.update(1)
        return matvec(v).to(dtype)

    gen = generator(seed, "trace")
    S = [random_vector(n, gen, dtype, device, "rademacher") for _ in range(s)]
    Q, _ = torch.linalg.qr(torch.stack([mv(v) for v in S], dim=1))
    exact = sum(float(q @ mv(q)) for q in Q.T)
    vals = []
    for _ in range(s):
        g = random_vector(n, gen, dtype, device, "rademacher")
        g = g - Q @ (Q.T @ g)
        vals.append(float(g @ mv(g)))
    bar.close()
    return TraceResult(exact + _mean(vals), _stderr(vals), 3 * s)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    *,
    method: str = "hutchpp",
    n_matvecs: int = 99,
    seed: int = 0,
    params: ParamSpec = None,
    progress: bool = False,
    **operator_kwargs,
) -> TraceResult:
    r"""Trace of the data-set Hessian :math:`\mathrm{tr}\,\nabla^2 L(w)`.

    Args:
        model, loss_fn, data, params: as in :class:`HessianOperator`.
        method: ``"hutchpp"`` (default; lower variance when a few eigenvalues
            dominate, as in trained networks) or ``"hutchinson"``.
        n_matvecs: product budget (Hutchinson: number of samples).
        seed: seed of the random probes.
        progress: show a progress bar on stderr.
        **operator_kwargs: ``mode``, ``dtype``, ``device``, ``cache`` (default ``"auto"``:
            keep first-order graphs when they fit the budget), ``distributed``.
    """
    H = HessianOperator(model, loss_fn, data, params, **{"cache": "auto", **operator_kwargs})
    if method == "hutchpp":
        return hutchpp(H, n_matvecs, seed=seed, progress=progress)
    if method == "hutchinson":
        return hutchinson(H, n_matvecs, seed=seed, progress=progress)
    raise ValueError(f"method must be 'hutchpp' or 'hutchinson', got {method!r}")


def _positive(v: int, name: str) -> None:
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


def _mean(vals: list[float]) -> float:
    return math.fsum(vals) / len(vals)


def _stderr(vals: list[float]) -> float:
    if len(vals) < 2:
        return float("nan")
    m = _mean(vals)
    return math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
