r"""Spectral density by stochastic Lanczos quadrature (SLQ), and a plot helper."""

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
from analysis._lanczos import _tridiag_eig, lanczos_tridiag
from analysis._linop import as_matvec, random_vector
from analysis.rng import generator


@dataclass
class SpectralDensity:
    r"""Gauss quadrature rules :math:`\{(\theta_{lj}, \omega_{lj})\}`, one per probe vector.

    The density estimate is :math:`\phi(t) = \frac{1}{L}\sum_l\sum_j \omega_{lj}\,
    g_\sigma(t-\theta_{lj})`; :math:`\int t^p\phi \approx \mathrm{tr}(H^p)/n`.

    Attributes:
        nodes: ``(L, m)`` Ritz values per probe.
        weights: ``(L, m)`` quadrature weights per probe (each row sums to 1).
        n_matvecs: products used.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n_matvecs: int

    def evaluate(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """The Gaussian-smoothed density on ``grid`` (default ``sigma``: 1% of the range)."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        sigma = sigma or max(hi - lo, 1e-12) / 100
        t = grid.to(torch.float64).reshape(-1, 1, 1)
        g = torch.exp(-((t - self.nodes) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
        return (g * self.weights).sum(dim=(1, 2)) / self.nodes.shape[0]

    def moment(self, p: int) -> float:
        r"""Estimate of :math:`\mathrm{tr}(H^p)/n` (exact per probe for :math:`p < 2m`)."""
        return float((self.weights * self.nodes**p).sum() / self.nodes.shape[0])


def slq(
    op: Any,
    n_iter: int = 80,
    n_probes: int = 1,
    *,
    n: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature.

    For each normalized Rademacher probe :math:`v_l`, ``n_iter`` Lanczos steps give
    :math:`T = S\Theta S^\top`; the rule is nodes :math:`\Theta` and weights
    :math:`S_{0j}^2`, so :math:`v_l^\top f(H) v_l \approx \sum_j S_{0j}^2 f(\theta_j)`.

    Reference: Ghorbani, Krishnan, Xiao, "An investigation into neural net
    optimization via Hessian eigenvalue density", ICML 2019.
    """
    matvec, n, dtype, device = as_matvec(op, n)
    if n_iter < 1 or n_probes < 1:
        raise ValueError(f"n_iter and n_probes must be >= 1, got {n_iter}, {n_probes}")
    m = min(n_iter, n)
    nodes = torch.zeros(n_probes, m, dtype=torch.float64)
    weights = torch.zeros(n_probes, m, dtype=torch.float64)
    count, gen = 0, generator(seed, "density")
    for i in tqdm(range(n_probes), desc="slq", disable=not progress, leave=False):
        v = random_vector(n, gen, dtype, device, "rademacher")
        alpha, beta, _, steps = lanczos_tridiag(matvec, v, m)
        theta, S = _tridiag_eig(alpha, beta)
        nodes[i, :steps], weights[i, :steps] = theta, S[0] ** 2
        count += steps
    return SpectralDensity(nodes, weights, count)


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    *,
    n_iter: int = 80,
    n_probes: int = 1,
    seed: int = 0,
    params: ParamSpec = None,
    progress: bool = False,
    **operator_kwargs,
) -> SpectralDensity:
    """Hessian eigenvalue density by :func:`slq` (arguments as in :class:`HessianOperator`)."""
    H = HessianOperator(model, loss_fn, data, params, **{"cache": "auto", **operator_kwargs})
    return slq(H, n_iter, n_probes, seed=seed, progress=progress)


def plot_density(
    density: SpectralDensity,
    ax=None,
    *,
    sigma: float | None = None,
    n_points: int = 1000,
    log: bool = True,
    **plot_kwargs,
):
    """Plot the smoothed density on a matplotlib axis (log y by default); return the axis."""
    import matplotlib.pyplot as plt

    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.5))[1]
    lo, hi = float(density.nodes.min()), float(density.nodes.max())
    pad = 0.05 * max(hi - lo, 1e-12)
    grid = torch.linspace(lo - pad, hi + pad, n_points, dtype=torch.float64)
    phi = density.evaluate(grid, sigma)
    ax.plot(grid.numpy(), (phi + 1e-12 if log else phi).numpy(), **plot_kwargs)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax
