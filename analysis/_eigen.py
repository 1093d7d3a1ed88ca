"""Hessian eigenvalues of a model on a data set: operator + solver in one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch  # noqa: F401  (doctest namespace)
from torch import nn

from analysis._functional import LossFn, ParamSpec
from analysis._hvp import HessianOperator
from analysis._lanczos import lanczos, warm_start_vector
from analysis._linop import EigenResult
from analysis._power import power_iteration
from analysis.batches import reiterable


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable,
    k: int = 1,
    *,
    method: str = "lanczos",
    which: str = "largest",
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int = 0,
    params: ParamSpec = None,
    progress: bool = False,
    se_groups: int = 0,
    **operator_kwargs,
) -> EigenResult:
    r"""Top-``k`` (or bottom-``k``) eigenpairs of the data-set Hessian :math:`\nabla^2 L(w)`.

    With ``se_groups`` :math:`= G \ge 2` the values get a standard error over the data,
    the delete-a-group jackknife (Efron & Stein 1981; Shao & Tu, *The Jackknife and
    Bootstrap*, 1995, §2.3): the batches are dealt round-robin into :math:`G` groups,
    :math:`\lambda_{(g)}` is the same solve on the data without group :math:`g`
    (warm-started from the full-data vectors, :func:`warm_start_vector`), and

    .. math:: \mathrm{SE} = \Big(\frac{G-1}{G}\sum_g \big(\lambda_{(g)} -
              \bar\lambda\big)^2\Big)^{1/2}.

    It estimates how much :math:`\lambda` would move on another sample of the same
    size (the spread between mini-batch estimates that PyHessian's users meet). It
    falls as :math:`1/\sqrt N`: four times the samples halve it. Use batches of
    equal size, so that the groups are too, and :math:`G \ge 8`: the error bar has
    :math:`G - 1` degrees of freedom, so with few groups it is itself noisy.

    Args:
        model, loss_fn, data, params: as in :class:`HessianOperator`.
        k: number of eigenpairs.
        method: ``"lanczos"`` (default, fewer products) or ``"power"`` (PyHessian's
            power iteration with deflation; top-k by magnitude only).
        which: ``"largest"`` or ``"smallest"`` (Lanczos only).
        tol: relative tolerance (see :func:`lanczos` and :func:`power_iteration`).
        max_iter: solver's iteration limit (its default when None).
        seed: seed of the start vector(s).
        progress: show a progress bar on stderr.
        se_groups: jackknife groups for ``stderr`` (0: none; needs that many batches).
        **operator_kwargs: ``mode``, ``dtype``, ``device``, ``cache`` (default ``"auto"``:
            keep first-order graphs when they fit the budget), ``distributed``.

    Returns:
        :class:`EigenResult`: ``.values``, ``.vectors``, ``.n_matvecs``, ``.residuals``.

    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> r = hessian_eigenvalues(nn.Linear(2, 1, bias=False), nn.MSELoss(),
    ...                         [(X, torch.zeros(2, 1))], tol=1e-8)
    >>> round(float(r.values[0]), 4)  # H = 2 X^T X / N = diag(1, 4)
    4.0
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if method == "power" and which != "largest":
        raise ValueError("method='power' finds the largest-magnitude pairs; use 'lanczos'")
    if se_groups and (se_groups < 2 or operator_kwargs.get("distributed")):
        raise ValueError(f"se_groups must be 0 or >= 2 (not distributed), got {se_groups}")
    kwargs = {"cache": "auto", **operator_kwargs}

    def solve(batches, v0=None, bar=progress) -> EigenResult:
        H = HessianOperator(model, loss_fn, batches, params, **kwargs)
        if method == "power":
            return power_iteration(H, k, tol=tol, max_iter=max_iter or 100, seed=seed,
                                   progress=bar)  # fmt: skip
        return lanczos(H, k, which=which, tol=tol, max_iter=max_iter, seed=seed, v0=v0,
                       progress=bar)  # fmt: skip

    if not se_groups:
        return solve(data)
    batches = list(reiterable(data))
    _check_groups(batches, se_groups)
    full = solve(batches)
    return jackknife(full, lambda b, v0: solve(b, v0, False), batches, se_groups, seed)


def _check_groups(batches: list, groups: int) -> None:
    if len(batches) < groups:
        raise ValueError(f"se_groups={groups} needs at least that many batches, got "
                         f"{len(batches)}; pass smaller batches")  # fmt: skip


def jackknife(
    full: EigenResult,
    solve: Callable[[list, torch.Tensor | None], EigenResult],
    batches: list,
    groups: int,
    seed: int = 0,
) -> EigenResult:
    """``full`` with the delete-a-group jackknife ``stderr`` (see :func:`hessian_eigenvalues`).

    ``solve(batches, v0)`` repeats the full solve on a subset, from start vector ``v0``
    (the full result's vectors, :func:`warm_start_vector`); its products are added.
    """
    _check_groups(batches, groups)
    v0 = warm_start_vector(full.vectors, seed)
    parts = [
        solve([b for i, b in enumerate(batches) if i % groups != g], v0) for g in range(groups)
    ]
    vals = torch.stack([p.values.to(torch.float64) for p in parts])
    se = ((groups - 1) / groups * ((vals - vals.mean(0)) ** 2).sum(0)).sqrt()
    full.stderr = se.to(full.values.dtype)
    full.n_matvecs += sum(p.n_matvecs for p in parts)
    full.converged = full.converged and all(p.converged for p in parts)
    return full
