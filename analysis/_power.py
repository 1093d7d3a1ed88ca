r"""Power iteration with deflation (the method of PyHessian) on any symmetric matvec."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from analysis._linop import EigenResult, as_matvec, random_vector
from analysis.rng import generator


def power_iteration(
    op: Any,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    n: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> EigenResult:
    r"""Top-``k`` eigenpairs by largest magnitude, by power iteration with deflation.

    For eigenpair :math:`i`, iterate :math:`v \leftarrow Hv/\|Hv\|` with :math:`v`
    kept orthogonal to the pairs already found, and stop when the Rayleigh
    quotient :math:`\theta = v^\top H v` changes by less than ``tol`` relative
    (PyHessian's criterion; it bounds the change, not the error).

    Args:
        op: a square tensor, an operator with ``.matvec``/``.shape``, or a callable
            (then give ``n``).
        k: number of eigenpairs.
        tol: relative change of the Rayleigh quotient at which to stop.
        max_iter: maximum products per eigenpair.
        n: vector length for a plain callable.
        seed: seed of the start vectors (pair ``i``: the stream ``(seed, "power", i)``).
        progress: show a tqdm bar on stderr.

    Returns:
        :class:`EigenResult` ordered as found (by decreasing magnitude).

    Reference: Yao et al., "PyHessian: Neural networks through the lens of the
    Hessian", 2020.

    >>> r = power_iteration(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)), tol=1e-12)
    >>> round(float(r.values[0]), 6)
    3.0
    """
    matvec, n, dtype, device = as_matvec(op, n)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n={n}, got {k}")
    found: list[torch.Tensor] = []
    values, residuals, count, converged = [], [], 0, True
    for i in tqdm(range(k), desc="power iteration", disable=not progress, leave=False):
        start = random_vector(n, generator(seed, "power", i), dtype, device)
        v, theta, done = _deflate(start, found), None, False
        for _ in range(max_iter):
            v = v / v.norm()
            w = _deflate(matvec(v).to(dtype), found)
            count += 1
            new = float(v @ w)
            done = theta is not None and abs(new - theta) <= tol * (abs(theta) + 1e-12)
            theta, prev, v = new, v, w
            if done or float(w.norm()) == 0.0:
                break
        converged &= done
        values.append(theta)
        residuals.append(float((w - theta * prev).norm()))
        found.append(prev)
    return EigenResult(
        torch.tensor(values, dtype=torch.float64),
        torch.stack(found),
        torch.tensor(residuals, dtype=torch.float64),
        count,
        converged,
    )


def _deflate(v: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    for u in basis:
        v = v - (u @ v) * u
    return v
