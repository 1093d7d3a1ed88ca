"""Flatness against the generalization gap: Spearman's rho and its seed bootstrap against
scipy, known monotone relations, and the table built from study curves."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from figures import recipes
from figures._gap import COLUMNS, WITHIN, gap_correlations, gap_findings, gap_points
from figures._stats import spearman, spearman_ci


def _clustered(seeds=10, methods=4, seed=0):
    """Points with a seed effect shared by every method of a seed, and a noisy relation."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(seeds), methods)
    x = rng.normal(size=g.size) + rng.normal(size=seeds)[g]
    y = 0.6 * x + rng.normal(size=g.size)
    return x, y, g


def test_spearman_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    xt, yt = rng.integers(0, 4, 40), rng.integers(0, 6, 40)  # many ties: mean ranks
    assert spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt).statistic, abs=1e-12)
    d = stats.rankdata(x) - stats.rankdata(y)  # no ties: the closed form
    assert spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (30 * (30**2 - 1)), abs=1e-12)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_known_monotone_relations_give_one_and_minus_one():
    x, _, g = _clustered()
    up = spearman_ci(x, np.exp(3 * x), g)  # strictly increasing, far from linear
    down = spearman_ci(x, -(x**3), g)
    assert (up.rho, up.lo, up.hi) == (1.0, 1.0, 1.0)
    assert (down.rho, down.lo, down.hi) == (-1.0, -1.0, -1.0)
    assert (up.n, up.groups) == (40, 10)


def test_seed_bootstrap_matches_scipy_bootstrap_over_seeds():
    """scipy's percentile bootstrap, resampling the seed indices, is the oracle; both are
    Monte Carlo with other draws, so they agree within their error (~0.01 at 5000)."""
    x, y, g = _clustered()
    ours = spearman_ci(x, y, g, n_boot=5000)
    rows = [np.flatnonzero(g == k) for k in range(10)]

    def rho(seeds):
        pick = np.concatenate([rows[int(k)] for k in seeds])
        return spearman(x[pick], y[pick])

    ref = stats.bootstrap((np.arange(10),), rho, vectorized=False, n_resamples=5000,
                          method="percentile", random_state=0).confidence_interval  # fmt: skip
    assert ours.rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert (ours.lo, ours.hi) == pytest.approx((ref.low, ref.high), abs=0.04)
    assert ours.lo < ours.rho < ours.hi


def test_seed_bootstrap_is_seeded_and_checks_its_input():
    x, y, g = _clustered(seeds=6)
    assert spearman_ci(x, y, g, n_boot=300) == spearman_ci(x, y, g, n_boot=300)
    assert spearman_ci(x, y, g, n_boot=300) != spearman_ci(x, y, g, n_boot=300, seed=1)
    one = spearman_ci(x[:4], y[:4], g[:4])  # one seed: no interval
    assert one.groups == 1 and math.isnan(one.lo) and math.isfinite(one.rho)
    with_nan = spearman_ci(np.r_[x, np.nan], np.r_[y, 1.0], np.r_[g, 0], n_boot=300)
    assert with_nan == spearman_ci(x, y, g, n_boot=300)  # the non-finite point left out
    with pytest.raises(ValueError, match="equal length"):
        spearman_ci(x, y[:-1], g)
    with pytest.raises(ValueError, match="confidence"):
        spearman_ci(x, y, g, confidence=1.0)


def _study_curves(seeds=8):
    """Final values of four methods and the control: the gap rises with lambda_max (exactly
    monotone), the trace falls with it, SAM sharpness is unrelated noise."""
    rng = np.random.default_rng(2)
    rows = []
    for k, method in enumerate(["sgd", "sam", "saf", "mesa", "sgd_ls"]):
        for s in range(seeds):
            lam = 10.0 + 3 * k + s + 0.1 * rng.random()
            ce = 0.2 + 0.01 * s
            vals = {"lambda_max": lam, "trace": 100 - lam, "sam_sharpness": rng.random(),
                    "checkpoint_ce": ce, "test_loss": ce + 0.01 * lam}  # fmt: skip
            for e in (0, 6):  # a first epoch that must not count
                rows += [(method, s, e, m, v * (1 if e else 9)) for m, v in vals.items()]
    return pd.DataFrame(rows, columns=["method", "seed", "epoch", "metric", "value"])


def test_flatness_vs_gap_table_findings_and_figure(tmp_path):
    c = _study_curves()
    p = gap_points(c)
    assert len(p) == 40 and p["gap"].to_numpy() == pytest.approx(0.01 * p["lambda_max"])
    t = gap_correlations(c, n_boot=500)
    assert list(t.columns) == COLUMNS and len(t) == 9
    r = t.set_index(["runs", "measure"])
    assert r.loc[("methods", "lambda_max"), ["spearman", "lo", "hi"]].tolist() == [1, 1, 1]
    assert r.loc[("methods", "trace"), "spearman"] == -1.0
    assert r.loc[("methods", "lambda_max"), "n_runs"] == 32
    assert r.loc[("methods + SGD label smoothing", "lambda_max"), "n_runs"] == 40
    noise = r.loc[("methods", "sam_sharpness")]
    assert noise.lo < noise.spearman < noise.hi and noise.n_seeds == 8
    text = " ".join(gap_findings(t, p))
    assert "Hessian lambda_max +1.00 [+1.00, +1.00]" in text and "32 runs, 8 seeds" in text
    assert "distinct resamples" not in text  # 8 seeds are plenty
    paths = recipes.flatness_vs_gap(p, t, tmp_path)
    assert {q.suffix for q in paths} == {".png", ".pdf"}


def test_within_seeds_removes_a_shared_seed_effect():
    """The gap rises with lambda_max inside every seed, but the seeds with the larger gaps
    have the smaller lambda_max: pooled, rho is negative; within seeds it is +1."""
    rows = []  # dyadic values: the centring is exact, so equal values stay tied
    for s in range(8):
        for k, method in enumerate(["sgd", "sam", "saf", "mesa"]):
            lam = 10.0 + k - 3 * s  # a later seed is flatter ...
            vals = {"lambda_max": lam, "trace": lam, "sam_sharpness": lam,
                    "checkpoint_ce": 0.25, "test_loss": 0.25 + k / 64 + s / 8}  # fmt: skip
            rows += [(method, s, 6, m, v) for m, v in vals.items()]  # ... with a larger gap
    c = pd.DataFrame(rows, columns=["method", "seed", "epoch", "metric", "value"])
    r = gap_correlations(c, n_boot=300).set_index(["runs", "measure"])
    assert r.loc[("methods", "lambda_max"), "spearman"] < -0.8
    assert r.loc[(WITHIN, "lambda_max"), ["spearman", "lo", "hi"]].tolist() == [1, 1, 1]
    text = " ".join(gap_findings(r.reset_index(), gap_points(c)))
    assert "less its seed's mean over the methods" in text
