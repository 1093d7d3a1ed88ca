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
from analysis.memory import fits
from analysis.rng import generator


def lanczos_tridiag(matvec, v0: torch.Tensor, steps: int, stop=None, locked=None):
    r"""Run up to ``steps`` Lanczos steps from ``v0``; return ``(alpha, beta, V, n_matvecs)``.

    ``stop(alpha, beta, b_next)`` is called after each step and may end the run.
    Full reorthogonalization (twice, "twice is enough") keeps ``V`` orthonormal.
    A breakdown (:math:`\beta \approx 0`: an invariant subspace was found) ends it too.
    ``locked`` (orthonormal rows :math:`X`, orthogonal to ``v0``) is kept out of the basis:
    this is Lanczos on the deflated operator :math:`(I - X^\top X) A (I - X^\top X)`.
    """
    n = v0.numel()
    locked = v0.new_zeros(0, n) if locked is None else locked
    V = torch.zeros(min(steps, n) + 1, n, dtype=v0.dtype, device=v0.device)
    V[0] = v0 / v0.norm()
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(min(steps, n)):
        w = matvec(V[j]).to(v0.dtype)
        a = float(V[j] @ w)
        w = w - a * V[j] - (beta[-1] * V[j - 1] if j > 0 else 0)
        w = _orthogonalize(w, locked, V[: j + 1])
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


def _orthogonalize(w: torch.Tensor, *bases: torch.Tensor) -> torch.Tensor:
    """Remove from ``w`` its components along the rows of each basis, twice."""
    for _ in range(2):
        for B in bases:
            w = w - B.T @ (B @ w)
    return w


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

    A Ritz pair :math:`(\theta_i, y_i)` is accepted when its residual norm
    :math:`r_i = \|A y_i - \theta_i y_i\|` (:math:`= |\beta_j s_{j,i}|`) satisfies

    .. math:: r_i \le \mathrm{tol}\cdot\max(|\theta_i|,\; 10^{-3}\|T\|).

    For a unit :math:`y` with Rayleigh quotient :math:`\theta`, some eigenvalue
    :math:`\lambda` of :math:`A` has :math:`|\lambda - \theta| \le \|Ay - \theta y\|`
    (Parlett 1998, Thm. 4.5.1), so each accepted value lies within that tolerance of an
    eigenvalue. Within a cluster narrower than about twice the tolerance, which member it
    is near is not resolved (the ``k``-th value may sit near the ``k+1``-th eigenvalue).
    :math:`\|T\|` is the largest :math:`|\theta|` seen, a lower bound of :math:`\|A\|`:
    below :math:`10^{-3}\|T\|` the tolerance turns absolute, since a
    relative error is out of reach for an eigenvalue near zero. (The sharper
    :math:`r_i^2/\mathrm{gap}` bound needs the gap to the rest of the true spectrum; the gap
    to the other Ritz values is too large while close eigenvalues are unresolved.)

    One Krylov space holds a single vector of each eigenspace and so misses the other
    copies of a repeated eigenvalue. For ``k > 1`` the top ``k - 1`` pairs of the first run
    are locked, and the ``k``-th is the top pair of a fresh run from a random vector,
    deflated of them (kept orthogonal to the locked vectors). If that value lies above the
    lowest locked one it was missed (a second copy): it is locked in turn and the fresh run
    repeats. The value of :math:`\lambda_1` does not depend on its multiplicity, so ``k=1``
    runs once. Like every Krylov method, this relies on random start vectors not being
    (nearly) orthogonal to a wanted eigenvector.

    Args:
        op: a square tensor, an operator with ``.matvec``/``.shape``, or a callable
            (then give ``n``).
        k: number of eigenpairs.
        which: ``"largest"`` (algebraic, top-k) or ``"smallest"`` (bottom-k).
        tol: relative eigenvalue tolerance (the bound above).
        max_iter: maximum matrix-vector products over all restarts
            (default ``max(20 * k, 100)``).
        n: vector length, for a plain callable ``op``.
        v0: start vector of the first run (default: standard normal from ``seed``).
        seed: seed of the start vector; run ``i`` draws from the stream
            ``(seed, "lanczos", i)`` (:func:`analysis.rng.generator`).
        progress: show a tqdm bar on stderr.

    Returns:
        :class:`EigenResult`; ``residuals`` are :math:`\|Ay_i - \theta_i y_i\|` and
        ``converged`` is true when every returned pair meets the bound and, for ``k > 1``,
        the last fresh run found no value above the locked ones.

    References: Parlett, *The Symmetric Eigenvalue Problem*, SIAM 1998, Thm. 4.5.1;
    Golub & Van Loan, *Matrix Computations*, 4th ed., §10.1; Bai et al., *Templates for
    the Solution of Algebraic Eigenvalue Problems*, SIAM 2000, ch. 4 (locking).

    >>> r = lanczos(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)), k=2, tol=1e-10)
    >>> [round(float(x), 6) for x in r.values]
    [10.0, 9.0]
    >>> D = torch.diag(torch.tensor([5.0, 5.0, 3.0, 1.0], dtype=torch.float64))
    >>> [round(float(x), 6) for x in lanczos(D, k=2, tol=1e-10).values]  # both copies of 5
    [5.0, 5.0]
    """
    matvec, n, dtype, device = as_matvec(op, n)
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n={n}, got {k}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    max_iter = max_iter or max(20 * k, 100)
    basis = (min(max_iter, n) + k + 1) * n * torch.empty((), dtype=dtype).element_size()
    fits(basis, f"Lanczos' basis for k={k} (up to {min(max_iter, n)} vectors of {n})", device,
         hint="ask for fewer eigenvalues")  # fmt: skip
    sign = 1.0 if which == "largest" else -1.0  # "smallest" is "largest" of -A
    bar = tqdm(total=max_iter, desc="lanczos", disable=not progress, leave=False)

    def mv(v):
        bar.update(1)
        return sign * matvec(v).to(dtype)

    def fresh(i):  # run i's start vector: its own stream
        return random_vector(n, generator(seed, "lanczos", i), dtype, device)

    start = v0.to(device, dtype) if v0 is not None else fresh(0)
    values, vectors, residuals, used, ok = _search(mv, k, tol, max_iter, start, fresh)
    bar.close()
    return EigenResult(sign * values, vectors, residuals, used, ok)


def warm_start_vector(vectors: torch.Tensor, seed: int = 0, mix: float = 0.1) -> torch.Tensor:
    r"""A Lanczos start vector from the Ritz vectors of a nearby operator (a previous epoch).

    :math:`v_0 = u + \text{mix}\,\|u\|\, z/\|z\|` with :math:`u = \sum_i y_i` (the rows
    of ``vectors``) and :math:`z` the cold start vector of ``seed`` (its stream
    ``(seed, "lanczos", 0)``, :func:`analysis.rng.generator`). The random part keeps every
    direction in the Krylov space, so an eigenvector that has no part in the old ones is still found
    (as from a cold start); the old part makes the wanted ones converge in fewer steps
    when the operator changed little. The stopping bound of :func:`lanczos` is
    unchanged, so the result is as accurate as a cold start's.

    Args:
        vectors: ``(k, n)`` or ``(n,)`` Ritz vectors (e.g. ``EigenResult.vectors``).
        seed: seed of the random part (the one a cold :func:`lanczos` would use).
        mix: relative weight of the random part.
    """
    V = vectors.reshape(-1, vectors.shape[-1]).to(torch.float64)
    u = (V / V.norm(dim=1, keepdim=True).clamp_min(1e-300)).sum(0)
    z = random_vector(u.numel(), generator(seed, "lanczos", 0), torch.float64, u.device)
    v = u + mix * u.norm() * z / z.norm()
    return v.to(vectors.dtype)


def _search(mv, k, tol, budget, start, fresh):
    """Top-k pairs of ``mv``: ``k - 1`` from one run, the k-th from fresh runs deflated of them.

    Returns ``(values, vectors, residuals, n_matvecs, converged)``.
    """
    n = start.numel()
    first = _run(mv, start, start.new_zeros(0, n), max(k - 1, 1), k > 1, budget, tol, 0.0)
    theta, X, res, used, ok, norm = first
    restart = 1
    while ok and k > 1:
        theta, X, res = theta[: k - 1], X[: k - 1], res[: k - 1]
        steps = min(budget - used, n - len(X))
        if steps < 1:
            return theta, X, res, used, False
        v = _orthogonalize(fresh(restart), X)
        t, Y, r, m, ok, T_norm = _run(mv, v, X, 1, False, steps, tol, norm)
        used, norm = used + m, max(norm, T_norm)
        missed = len(X) < k - 1 or t[0] - r[0] > theta[-1] + res[-1]  # above the lowest locked
        theta, X, res = _insert(theta, X, res, t, Y, r)
        if not missed:
            break
        restart += 1
    theta, X, res = theta[:k], X[:k], res[:k]
    return theta, X, res, used, ok and len(theta) == k and _accepted(theta, res, tol, norm)


def _run(mv, start, X, want, guard, steps, tol, norm):
    r"""One Lanczos run deflated of the rows of ``X``, stopped once the top ``want`` converge.

    Returns the top ``want`` Ritz values (one more with ``guard``), vectors, residuals, the
    products used, whether they met the bound (see :func:`_converged`), and :math:`\|T\|`.
    The residual against :math:`A` adds the part :math:`X A y` (from the recorded
    :math:`X A v_j`) to the deflated one, :math:`|\beta_j s_{j,i}|`: the two are orthogonal.
    """
    coupling = []

    def coupled(v):
        w = mv(v)
        coupling.append(X @ w)
        return w

    def check(alpha, beta, need):
        theta, S, res, T_norm = _ritz(alpha, beta, want + guard)
        res = _with_coupling(res, S, coupling)
        ok = _converged(theta, res, need, guard, tol, max(norm, T_norm))
        return theta, S, res, T_norm, ok

    def stop(alpha, beta, b):
        return check(alpha, beta + [b], want)[-1]

    alpha, beta, V, used = lanczos_tridiag(coupled, start, steps, stop, X)
    breakdown = beta[-1] == 0.0  # an invariant subspace: fewer than ``want`` pairs may exist
    theta, S, res, T_norm, ok = check(alpha, beta, min(want, used) if breakdown else want)
    return theta, S.T.to(V) @ V, res, used, ok, T_norm


def _converged(theta, res, want, guard, tol, norm) -> bool:
    """The bound holds for the top ``want`` pairs; with ``guard`` their joint residual is also
    at most half the next value's tolerance (it reappears in the residuals of the run
    deflated of them, so it must not use up that run's whole tolerance)."""
    ok = len(theta) >= want and _accepted(theta[:want], res[:want], tol, norm)
    if guard and len(theta) > want:
        ok = ok and _accepted(theta[want:], 2 * res[:want].norm().reshape(1), tol, norm)
    return ok


def _with_coupling(res, S, coupling):
    """Residuals against A: the deflated ones and the parts along the locked vectors."""
    if not coupling or not len(coupling[0]):
        return res
    C = torch.stack(coupling).to(S)
    return torch.sqrt(res**2 + ((C.T @ S) ** 2).sum(dim=0))


def _ritz(alpha, beta, keep):
    """Top ``keep`` Ritz values (descending), their Krylov coordinates, residuals, ``max|θ|``."""
    evals, evecs = _tridiag_eig(alpha, beta)
    idx = torch.arange(len(alpha) - 1, max(len(alpha) - 1 - keep, -1), -1)
    S = evecs[:, idx]
    return evals[idx], S, (beta[-1] * S[-1]).abs(), float(evals.abs().max())


def _accepted(theta, res, tol: float, norm: float) -> bool:
    """The bound ``res <= tol * max(|theta|, 1e-3 * norm)`` holds for every pair."""
    return bool((res <= tol * torch.clamp(theta.abs(), min=1e-3 * norm)).all())


def _insert(theta, X, res, t, Y, r):
    """Add locked pairs and keep them sorted by value, largest first."""
    theta, X, res = torch.cat([theta, t]), torch.cat([X, Y]), torch.cat([res, r])
    order = theta.argsort(descending=True)
    return theta[order], X[order.to(X.device)], res[order]
