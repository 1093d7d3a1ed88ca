r"""Lanczos with full reorthogonalization on any symmetric matvec.

After :math:`j` steps, :math:`A V_j = V_j T_j + \beta_j v_{j+1} e_j^\top` with
:math:`T_j` tridiagonal. A Ritz pair :math:`(\theta_i, V_j s_i)` has residual
:math:`\|A V_j s_i - \theta_i V_j s_i\| = |\beta_j s_{j,i}|` at no extra cost.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from analysis._linop import EigenResult, as_matvec, random_vector


def lanczos_tridiag(matvec, v0: torch.Tensor, steps: int, stop=None):
    r"""Run up to ``steps`` Lanczos steps from ``v0``; return ``(alpha, beta, V, n_matvecs)``.

    ``stop(alpha, beta, b_next)`` is called after each step and may end the run.
    Full reorthogonalization (twice, "twice is enough") keeps ``V`` orthonormal.
    A breakdown (:math:`\beta \approx 0`: an invariant subspace was found) ends it too.
    """
    n = v0.numel()
    V = torch.zeros(min(steps, n) + 1, n, dtype=v0.dtype, device=v0.device)
    V[0] = v0 / v0.norm()
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(min(steps, n)):
        w = matvec(V[j]).to(v0.dtype)
        a = float(V[j] @ w)
        w = w - a * V[j] - (beta[-1] * V[j - 1] if j > 0 else 0)
        for _ in range(2):
            w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        alpha.append(a)
        b = float(w.norm())
        scale = max(max(abs(x) for x in alpha), max(beta, default=0.0))
        breakdown = b <= 1e-12 * scale
        if breakdown or (stop is not None and stop(alpha, beta, b)) or j + 1 == min(steps, n):
            beta.append(0.0 if breakdown else b)
            return alpha, beta, V[: j + 1], j + 1
        beta.append(b)
        V[j + 1] = w / b
    return alpha, beta, V[:0], 0


def _tridiag_eig(alpha: list[float], beta: list[float]):
    k = len(alpha)
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(beta[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(T)


def lanczos(
    op: Any,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-4,
    max_iter: int | None = None,
    n: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
) -> EigenResult:
    r"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Stops when every wanted Ritz value :math:`\theta_i` has an error estimate
    :math:`\min(r_i,\; r_i^2/\mathrm{gap}_i) \le \mathrm{tol}\cdot\max(|\theta_i|,
    10^{-3}\|T\|)`, where :math:`r_i = |\beta_j s_{j,i}|` is the residual norm and
    :math:`\mathrm{gap}_i` the distance to the nearest other Ritz value (the
    a-posteriori bound for symmetric matrices, Parlett 1998, Thm. 11.7.1).

    Args:
        op: a square tensor, an operator with ``.matvec``/``.shape``, or a callable
            (then give ``n``).
        k: number of eigenpairs.
        which: ``"largest"`` (algebraic, top-k) or ``"smallest"`` (bottom-k).
        tol: relative eigenvalue tolerance.
        max_iter: maximum Lanczos steps (default ``min(n, max(20 * k, 100))``).
        v0: start vector (default: standard normal from ``seed``).
        seed: seed of the start vector.
        progress: show a tqdm bar on stderr.

    Returns:
        :class:`EigenResult` with ``values``, ``vectors``, ``residuals``, ``n_matvecs``.

    Reference: Golub & Van Loan, *Matrix Computations*, 4th ed., §10.1.

    >>> r = lanczos(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)), k=2, tol=1e-10)
    >>> [round(float(x), 6) for x in r.values]
    [10.0, 9.0]
    """
    matvec, n, dtype, device = as_matvec(op, n)
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n={n}, got {k}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    max_iter = max_iter or min(n, max(20 * k, 100))
    v = v0.to(device, dtype) if v0 is not None else random_vector(n, seed, dtype, device)
    bar = tqdm(total=max_iter, desc="lanczos", disable=not progress, leave=False)

    def stop(alpha, beta, b):
        bar.update(1)
        return len(alpha) >= k and bool(_estimates(alpha, beta + [b], k, which, tol)[2].all())

    alpha, beta, V, steps = lanczos_tridiag(matvec, v, max_iter, stop)
    bar.close()
    theta, S, ok, res = _estimates(alpha, beta, k, which, tol)
    vectors = (S.to(V.dtype).to(V.device).T @ V).reshape(len(theta), n)
    return EigenResult(theta, vectors, res, steps, bool(ok.all()) and len(theta) == k)


def _estimates(alpha, beta, k, which, tol):
    """Wanted Ritz values, vectors (in the Krylov basis), convergence flags, residuals."""
    evals, evecs = _tridiag_eig(alpha, beta)
    idx = torch.arange(len(alpha) - 1, max(len(alpha) - 1 - k, -1), -1)
    if which == "smallest":
        idx = torch.arange(min(k, len(alpha)))
    theta, S = evals[idx], evecs[:, idx]
    res = (beta[-1] * S[-1]).abs()
    others = evals.unsqueeze(0) - theta.unsqueeze(1)
    others[torch.arange(len(idx)), idx] = float("inf")
    gap = others.abs().min(dim=1).values if len(alpha) > 1 else torch.zeros_like(theta)
    err = torch.minimum(res, res**2 / gap)
    scale = torch.clamp(theta.abs(), min=1e-3 * float(evals.abs().max()))
    return theta, S, err <= tol * scale, res
