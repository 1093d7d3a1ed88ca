"""Hessian eigenvalues of a model on a data set: operator + solver in one call."""

from __future__ import annotations

from collections.abc import Iterable

import torch  # noqa: F401  (doctest namespace)
from torch import nn

from analysis._functional import LossFn, ParamSpec
from analysis._hvp import HessianOperator
from analysis._lanczos import lanczos
from analysis._linop import EigenResult
from analysis._power import power_iteration


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
    **operator_kwargs,
) -> EigenResult:
    r"""Top-``k`` (or bottom-``k``) eigenpairs of the data-set Hessian :math:`\nabla^2 L(w)`.

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
    H = HessianOperator(model, loss_fn, data, params, **{"cache": "auto", **operator_kwargs})
    if method == "lanczos":
        return lanczos(H, k, which=which, tol=tol, max_iter=max_iter, seed=seed, progress=progress)
    if method == "power":
        if which != "largest":
            raise ValueError("method='power' finds the largest-magnitude pairs; use 'lanczos'")
        return power_iteration(
            H, k, tol=tol, max_iter=max_iter or 100, seed=seed, progress=progress
        )
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
