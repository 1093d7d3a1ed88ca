"""Eigen-solvers, trace and density against dense eigh, scipy eigsh and closed forms (float64)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis import (
    HessianOperator,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    hutchinson,
    hutchpp,
    lanczos,
    plot_density,
    power_iteration,
    slq,
    warm_start_vector,
)
from analysis.rng import generator
from tests.analysis._models import batches, dense_hessian, mlp

CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)
    model, data = mlp(bn=True), batches()
    H = dense_hessian(model, CE, data)
    return model, data, H, torch.linalg.eigh(H)


def _same_up_to_sign(a, b, tol=1e-6):
    cos = (a * b).sum(-1).abs() / (a.norm(dim=-1) * b.norm(dim=-1))
    assert torch.all(cos > 1 - tol), cos


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_on_the_network_matches_eigh(problem, which):
    model, data, H, (evals, evecs) = problem
    r = hessian_eigenvalues(model, CE, data, k=3, which=which, tol=1e-10)
    idx = [-1, -2, -3] if which == "largest" else [0, 1, 2]
    torch.testing.assert_close(r.values, evals[idx], rtol=1e-6, atol=0)
    _same_up_to_sign(r.vectors, evecs[:, idx].T)
    assert r.converged and 3 <= r.n_matvecs <= 2 * H.shape[0]  # k > 1: two runs (see lanczos)
    true_res = (H @ r.vectors.T - r.vectors.T * r.values).norm(dim=0)
    torch.testing.assert_close(r.residuals, true_res, rtol=1e-3, atol=1e-9)


def test_lanczos_matches_scipy_eigsh(problem):
    from scipy.sparse.linalg import eigsh

    model, data, _, _ = problem
    op = HessianOperator(model, CE, data)
    ref = np.sort(eigsh(op.to_scipy(), k=4, which="LA", tol=1e-12)[0])[::-1]
    ours = lanczos(op, 4, tol=1e-10).values.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_power_iteration_with_deflation_finds_largest_magnitude(problem):
    model, data, H, (evals, evecs) = problem
    r = hessian_eigenvalues(model, CE, data, k=2, method="power", tol=1e-12, max_iter=5000)
    order = evals.abs().argsort(descending=True)[:2]
    torch.testing.assert_close(r.values, evals[order], rtol=1e-6, atol=0)
    _same_up_to_sign(r.vectors, evecs[:, order].T, tol=1e-5)


def test_lanczos_needs_fewer_products_than_power(problem):
    model, data, H, (evals, _) = problem
    lz = lanczos(H, 1, tol=1e-8)
    pw = power_iteration(H, 1, tol=1e-10, max_iter=10000)
    assert abs(lz.values[0] / evals[-1] - 1) < 1e-8
    assert lz.n_matvecs < pw.n_matvecs


def test_linear_model_mse_closed_form():
    """H = 2 X^T X / N for a linear model without bias and mean-squared error."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    data = [(X[:15], y[:15]), (X[15:], y[15:])]
    H = 2 * X.T @ X / 40
    evals = torch.linalg.eigvalsh(H)
    r = hessian_eigenvalues(model, nn.MSELoss(), data, k=3, tol=1e-12)
    torch.testing.assert_close(r.values, evals.flip(0)[:3], rtol=1e-6, atol=0)
    tr = hessian_trace(model, nn.MSELoss(), data, method="hutchpp", n_matvecs=18)
    assert tr.value == pytest.approx(float(H.trace()), rel=1e-10)  # rank 6 <= 18 / 3: exact


def test_lanczos_breakdown_and_validation():
    D = torch.diag(torch.tensor([5.0, 5.0, 1.0], dtype=torch.float64))
    r = lanczos(D, 1, tol=1e-10)
    assert r.values[0] == pytest.approx(5.0) and r.n_matvecs <= 3
    with pytest.raises(ValueError, match="which"):
        lanczos(D, which="middle")
    with pytest.raises(ValueError, match="k must"):
        lanczos(D, 4)
    with pytest.raises(ValueError, match="n="):
        lanczos(lambda v: v)


def test_hutchinson_converges_at_the_expected_rate(problem):
    _, _, H, _ = problem
    exact = float(H.trace())
    sigma = math.sqrt(2 * (float((H**2).sum()) - float((H.diagonal() ** 2).sum())))
    errs = []
    for m in (16, 256, 4096):
        r = hutchinson(H, m, seed=m)
        errs.append(abs(r.value - exact))
        assert errs[-1] <= 4 * sigma / math.sqrt(m)
        assert r.stderr == pytest.approx(sigma / math.sqrt(m), rel=0.5)
    assert errs[-1] < errs[0]


def test_hutchpp_exact_on_low_rank_and_better_than_hutchinson():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    low = U[:, :4] @ torch.diag(torch.tensor([50.0, 20, 10, 5], dtype=torch.float64)) @ U[:, :4].T
    assert hutchpp(low, 12).value == pytest.approx(85.0, rel=1e-10)
    A = low + U[:, 4:] @ torch.diag(torch.linspace(0, 0.01, 196, dtype=torch.float64)) @ U[:, 4:].T
    exact = float(A.trace())
    errs_pp = [abs(hutchpp(A, 30, seed=s).value - exact) for s in range(10)]
    errs_h = [abs(hutchinson(A, 30, seed=s).value - exact) for s in range(10)]
    assert np.mean(errs_pp) < 0.1 * np.mean(errs_h)


def test_trace_of_the_network(problem):
    model, data, H, _ = problem
    n = H.shape[0]
    r = hessian_trace(model, CE, data, method="hutchpp", n_matvecs=3 * n)
    assert r.value == pytest.approx(float(H.trace()), rel=1e-8)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, CE, data, method="exact")


def test_slq_moments_exact_and_converge(problem):
    model, data, H, (evals, _) = problem
    n = H.shape[0]
    d = hessian_density(model, CE, data, n_iter=10, n_probes=3, seed=1)
    torch.testing.assert_close(d.weights.sum(1), torch.ones(3, dtype=torch.float64))
    gen = generator(1, "density")  # the probes, in order
    for i in range(3):  # Gauss quadrature with 10 nodes is exact for degree <= 19
        z = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        for p in (1, 2, 5):
            quad = float((d.weights[i] * d.nodes[i] ** p).sum())
            exact = float(z @ torch.linalg.matrix_power(H, p) @ z) / n
            assert quad == pytest.approx(exact, rel=1e-8, abs=1e-12)
    full = slq(H, n_iter=n, n_probes=1)  # n steps: nodes are the eigenvalues
    torch.testing.assert_close(full.nodes[0].sort().values, evals, rtol=1e-8, atol=1e-10)
    errs = [abs(slq(H, 20, L, seed=5).moment(1) - float(evals.mean())) for L in (2, 200)]
    assert errs[1] < errs[0]


def test_density_evaluate_integrates_to_one_and_plots(problem):
    _, _, H, _ = problem
    d = slq(H, 15, 4)
    lo, hi = float(d.nodes.min()) - 1, float(d.nodes.max()) + 1
    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    phi = d.evaluate(grid, sigma=0.01)
    assert float(torch.trapezoid(phi, grid)) == pytest.approx(1.0, rel=1e-3)
    import matplotlib

    matplotlib.use("Agg")
    ax = plot_density(d)
    assert ax.get_yscale() == "log" and len(ax.lines) == 1


def test_warm_start_vector_from_a_nearby_operator_saves_products():
    """Lanczos on A + E from A's Ritz vectors: the same accuracy as a cold start, fewer steps."""
    g = torch.Generator().manual_seed(0)
    n = 400
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) @ Q.T
    E = torch.randn(n, n, generator=g, dtype=torch.float64) * 1e-4
    B = A + (E + E.T) / 2
    exact = torch.linalg.eigvalsh(B).flip(0)[:3]
    old = lanczos(A, k=3, tol=1e-8)
    cold = lanczos(B, k=3, tol=1e-8)
    warm = lanczos(B, k=3, tol=1e-8, v0=warm_start_vector(old.vectors))
    for r in (cold, warm):
        assert r.converged
        assert torch.allclose(r.values, exact, rtol=1e-8, atol=0)
    assert warm.n_matvecs < cold.n_matvecs


def test_lambda_stderr_is_the_delete_a_group_jackknife_of_the_closed_form():
    """Linear model + MSE: H = 2 X^T X / N on every subset, so each leave-a-group-out
    top-2 is a dense eigvalsh; the jackknife of those is the oracle."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 6, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 6)
    y = torch.randn(60, 1, generator=g, dtype=torch.float64)
    data = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 60, 10)]
    model = nn.Linear(6, 1, bias=False).double()
    r = hessian_eigenvalues(model, nn.MSELoss(), data, k=2, tol=1e-10, se_groups=3)

    def top2(rows):
        A = torch.cat([X[i * 10 : i * 10 + 10] for i in rows])
        return torch.linalg.eigvalsh(2 * A.T @ A / len(A)).flip(0)[:2]

    assert torch.allclose(r.values, top2(range(6)), rtol=1e-9)
    loo = torch.stack([top2([i for i in range(6) if i % 3 != k]) for k in range(3)])
    se = (2 / 3 * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    assert r.converged and torch.allclose(r.stderr, se, rtol=1e-6)
    assert hessian_eigenvalues(model, nn.MSELoss(), data, tol=1e-10).stderr is None
    with pytest.raises(ValueError, match="batches"):
        hessian_eigenvalues(model, nn.MSELoss(), data[:2], se_groups=3)
