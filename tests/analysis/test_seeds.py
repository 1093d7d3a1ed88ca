"""Consecutive seeds give independent replicates: their spread matches their standard errors.

Oracle: a linear model with MSE, whose Hessian is exactly H = 2 X^T X / N (bias included),
so the true trace is known; 20 replicates over seeds 0..19 are checked with a chi-square test.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from analysis import hessian_eigenvalues, hessian_trace, m_sharpness
from analysis.rng import generator, stream_seed
from landscape import random_direction

SEEDS = range(20)


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 40, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 40)
    y = torch.randn(256, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(40, 1).double()
    Xb = torch.cat([X, torch.ones(256, 1, dtype=torch.float64)], 1)
    H = 2 * Xb.T @ Xb / len(X)
    return model, [(X[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)], H


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_replicates_over_consecutive_seeds_are_calibrated(linear, method):
    """sum_s ((t_s - tr H) / se_s)^2 ~ chi2(20), and the spread about the replicates' own
    mean ~ chi2(19): seeds sharing probes (seed + i) gave replicates far tighter than
    their errors, which the lower bound catches."""
    model, data, H = linear
    rs = [
        hessian_trace(model, F.mse_loss, data, method=method, n_matvecs=30, seed=s) for s in SEEDS
    ]
    t, se = np.array([r.value for r in rs]), np.array([r.stderr for r in rs])
    about_truth = float((((t - float(H.trace())) / se) ** 2).sum())
    about_mean = float((((t - t.mean()) / se) ** 2).sum())
    for value, df in ((about_truth, 20), (about_mean, 19)):
        assert stats.chi2.ppf(0.001, df) < value < stats.chi2.ppf(0.999, df), (value, df)


def test_random_directions_of_consecutive_seeds_are_independent():
    """No direction of one seed reappears in another: |cos| stays at the 1/sqrt(n) noise level."""
    model = torch.nn.Linear(200, 10)
    flat = [
        torch.cat([d["weight"].reshape(-1)])
        for s in range(5)
        for d in (random_direction(model, seed=s, index=i) for i in range(2))
    ]
    V = torch.nn.functional.normalize(torch.stack(flat), dim=1)
    cos = (V @ V.T - torch.eye(len(V))).abs()
    assert float(cos.max()) < 5 / (V.shape[1] ** 0.5)


def test_streams_differ_per_seed_purpose_and_index():
    keys = [
        (s, p, i) for s in range(10) for p in ("trace", "lanczos", "direction") for i in range(3)
    ]
    assert len({stream_seed(*k) for k in keys}) == len(keys)
    a = torch.randn(5, generator=generator(-1, "trace"))  # negative seeds are valid keys
    assert torch.equal(a, torch.randn(5, generator=generator(-1, "trace")))


def test_m_sharpness_noise_and_lanczos_starts_are_per_seed(linear):
    """Average m-sharpness and Lanczos of two seeds draw different noise / start vectors."""
    model, data, _ = linear
    a, b = (
        m_sharpness(model, F.mse_loss, data, rho=0.1, kind="average", seed=s).values for s in (0, 1)
    )
    assert a != b
    r0, r1 = (hessian_eigenvalues(model, F.mse_loss, data, k=1, tol=1e-3, seed=s) for s in (0, 1))
    assert r0.converged and r1.converged
