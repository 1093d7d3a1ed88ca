"""Lanczos stopping rule and repeated eigenvalues against dense eigvalsh/eigh (float64)."""

import pytest
import torch

from analysis import lanczos


def _orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _with_spectrum(values, seed=0):
    values = torch.tensor(values, dtype=torch.float64)
    Q = _orthogonal(len(values), seed)
    return Q @ torch.diag(values) @ Q.T


def _true_residuals(A, r):
    return (A @ r.vectors.T - r.vectors.T * r.values).norm(dim=0)


def test_close_top_pair_is_resolved_before_it_converges():
    """The issue's reproduction: the old Ritz-gap rule returned 0.99991 with converged=True."""
    A = _with_spectrum([1.0, 1 - 1e-4] + torch.linspace(0, 0.9, 300).tolist())
    lam = torch.linalg.eigvalsh(A)[-1]
    r = lanczos(A, k=1, tol=1e-6, seed=0)
    assert r.converged
    assert abs(r.values[0] - lam) <= 1e-6 * abs(lam)


@pytest.mark.parametrize("gap", [1e-4, 1e-3, 1e-2])
@pytest.mark.parametrize("tol", [1e-4, 1e-6])
@pytest.mark.parametrize("k", [1, 2])
def test_converged_means_within_tol_of_the_same_rank(gap, tol, k):
    """Basis and start vector drawn independently (one seed for both correlates them)."""
    n, converged = 200, 0
    for seed in range(20):
        values = [1.0, 1 - gap] + torch.linspace(0, 0.9, n - 2).tolist()
        A = _with_spectrum(values, 1000 + seed)
        lam = torch.linalg.eigvalsh(A).flip(0)[:k]
        r = lanczos(A, k=k, tol=tol, seed=seed, max_iter=2 * n)
        if r.converged:
            converged += 1
            err = (r.values - lam).abs()
            assert torch.all(err <= tol * lam.abs()), (seed, err / lam.abs())
    assert converged >= 18


def _repeated(top):
    """Spectrum ``top`` followed by 197 values in [0, 2.5], in a random basis."""
    values = list(top) + torch.linspace(0, 2.5, 200 - len(top)).tolist()
    return _with_spectrum(values, seed=1), torch.tensor(
        sorted(values, reverse=True), dtype=torch.float64
    )


@pytest.mark.parametrize(
    "top, k", [((5.0, 5.0, 3.0), 2), ((5.0, 5.0, 3.0), 3), ((5.0, 5.0, 5.0, 3.0), 4)]
)
def test_repeated_eigenvalues_are_all_found(top, k):
    A, evals = _repeated(top)
    tol = 1e-8
    r = lanczos(A, k=k, tol=tol, max_iter=300)
    assert r.converged
    torch.testing.assert_close(r.values, evals[:k], rtol=tol, atol=0)
    torch.testing.assert_close(
        r.vectors @ r.vectors.T, torch.eye(k, dtype=A.dtype), atol=1e-10, rtol=0
    )
    true = _true_residuals(A, r)
    assert torch.all(true <= tol * r.values.abs())
    torch.testing.assert_close(r.residuals, true, rtol=1e-3, atol=1e-12)


def test_repeated_eigenvalues_of_a_small_matrix_with_exact_breakdowns():
    D = torch.diag(torch.tensor([5.0, 5.0, 5.0, 1.0], dtype=torch.float64))
    for k, want in [(2, [5.0, 5.0]), (3, [5.0, 5.0, 5.0]), (4, [5.0, 5.0, 5.0, 1.0])]:
        r = lanczos(D, k=k, tol=1e-10)
        assert r.converged and r.values.tolist() == pytest.approx(want, rel=1e-12)
        assert r.n_matvecs <= 4 * k


def _same_up_to_sign(a, b, tol=1e-8):
    cos = (a * b).sum(-1).abs() / (a.norm(dim=-1) * b.norm(dim=-1))
    assert torch.all(cos > 1 - tol), cos


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_and_bottom_k_match_eigh(which, seed):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(150, 150, generator=g, dtype=torch.float64)
    A = (G + G.T) / 2
    evals, evecs = torch.linalg.eigh(A)
    idx = torch.arange(149, 144, -1) if which == "largest" else torch.arange(5)
    r = lanczos(A, k=5, which=which, tol=1e-10, max_iter=600, seed=seed)
    assert r.converged
    torch.testing.assert_close(r.values, evals[idx], rtol=1e-10, atol=0)
    _same_up_to_sign(r.vectors, evecs[:, idx].T)
    torch.testing.assert_close(r.residuals, _true_residuals(A, r), rtol=1e-3, atol=1e-12)


def test_max_iter_bounds_the_products_of_all_runs():
    A, _ = _repeated((5.0, 5.0, 3.0))
    r = lanczos(A, k=2, tol=1e-8, max_iter=20)  # the first run converges, the fresh one cannot
    assert r.n_matvecs <= 20 and not r.converged and len(r.values) == 2


def test_well_separated_top_eigenvalue_stays_cheap():
    """One run, a few products more than the old (invalid) rule's 7 to 10 here."""
    A = _with_spectrum([10.0, 7.0, 5.0] + torch.linspace(0, 4.9, 197).tolist())
    for seed in range(5):
        r = lanczos(A, k=1, tol=1e-4, seed=seed)
        assert r.converged and abs(r.values[0] - 10) <= 1e-3 and r.n_matvecs <= 12


@pytest.mark.parametrize("seed", range(6))
def test_every_converged_value_is_within_its_residual_of_an_eigenvalue(seed):
    """The documented guarantee, on perturbed near-triple clusters (where which member of a
    cluster narrower than the tolerance is found is not resolved): |theta - lambda| <= r."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    d = torch.tensor([1, 1 - 1e-4, 1 - 2e-4, 0.95, 0.95] + torch.linspace(0, 0.8, 195).tolist())
    E = torch.randn(200, 200, generator=g, dtype=torch.float64) * 1e-4
    A = Q @ torch.diag(d.double()) @ Q.T + (E + E.T) / 2
    ev = torch.linalg.eigvalsh(A)
    for k in (1, 2, 3):
        r = lanczos(A, k=k, tol=1e-4, seed=seed)
        assert r.converged
        for theta, res in zip(r.values, r.residuals, strict=True):
            assert float((ev - theta).abs().min()) <= float(res) * (1 + 1e-9) + 1e-14
            assert float(res) <= 1e-4 * abs(float(theta))
