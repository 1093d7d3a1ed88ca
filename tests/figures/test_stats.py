"""The verdict's statistics against scipy and hand computations; the controls' fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from figures._controls import (
    fit_temperature,
    last_linear,
    mean_ce,
    smoothing_for_ce,
    temperature_matched,
)
from figures._stats import holm, paired_ratio, seeds_for_power

X = np.array([1.9, 2.4, 1.2, 3.1, 2.2, 1.7])
Y = np.array([1.0, 1.3, 0.9, 1.4, 1.1, 1.2])


def test_paired_ratio_matches_scipy():
    d = np.log(X / Y)
    r = paired_ratio(X, Y)
    lo, hi = stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=stats.sem(d))
    assert r.n == 6
    assert r.ratio == pytest.approx(math.exp(d.mean()), rel=1e-12)
    assert (r.lo, r.hi) == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-12)
    assert r.p == pytest.approx(stats.ttest_rel(np.log(X), np.log(Y)).pvalue, rel=1e-12)


def test_paired_ratio_leaves_out_bad_pairs_and_needs_two():
    r = paired_ratio([2.0, np.nan, -1.0], [1.0, 1.0, 1.0])
    assert r.n == 1 and r.ratio == 2.0 and math.isnan(r.lo) and math.isnan(r.p)
    with pytest.raises(ValueError, match="equal shapes"):
        paired_ratio([1.0], [1.0, 2.0])


def test_seeds_for_power_against_noncentral_t():
    delta = 0.8
    n = int(seeds_for_power(delta))

    def power(k):
        crit = stats.t.ppf(0.975, k - 1)
        return stats.nct.sf(crit, k - 1, delta * math.sqrt(k)) + stats.nct.cdf(
            -crit, k - 1, delta * math.sqrt(k)
        )

    assert power(n) >= 0.8 > power(n - 1)
    assert n == 15  # G*Power, paired t, d = 0.8, two-sided alpha 0.05, power 0.8
    assert seeds_for_power(0.0) == math.inf


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    expected = [0.03, 0.06, 0.06, 0.02, np.nan]
    np.testing.assert_allclose(holm(p), expected, rtol=1e-12)


def _tiny():
    """A small classifier whose labels are mostly its own predictions, as a trained model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(64, 5, dtype=torch.float64)
    with torch.no_grad():
        model[2].weight.mul_(4)
        y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 3  # a few mistakes: the CE has a minimum over T
    return model, [(x[:40], y[:40]), (x[40:], y[40:])]


@pytest.mark.parametrize("target", [0.5, 0.9, 1.09])
def test_temperature_fit_reaches_target_ce(target):
    model, data = _tiny()
    scaled, t = temperature_matched(model, data, target)
    assert abs(mean_ce(scaled, data) - target) < 1e-4
    assert mean_ce(model, data, temperature=t) == pytest.approx(target, abs=1e-9)
    assert last_linear(scaled).weight.data == pytest.approx(last_linear(model).weight.data / t)


def test_temperature_fit_refuses_unreachable_targets():
    model, data = _tiny()
    with pytest.raises(ValueError, match="no temperature"):
        fit_temperature(model, data, math.log(3) + 0.1)  # above log K
    with pytest.raises(ValueError, match="no nn.Linear"):
        last_linear(nn.Sequential(nn.Tanh()))


def test_smoothing_floor_is_the_fitted_models_ce():
    s = smoothing_for_ce(0.05, 10)
    p_true = 1 - s + s / 10
    assert -math.log(p_true) == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ValueError, match="chance"):
        smoothing_for_ce(5.0, 10)


def test_verdict_pairs_seeds_and_holm_corrects():
    import pandas as pd

    from figures import verdict_display, verdict_table

    sgd, ratios = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.6, 0.45, 0.7])
    rows = []
    for m, final in (("sgd", sgd), ("saf", sgd * ratios), ("sgd_ls", sgd * 0.8)):
        for s, v in enumerate(final):
            for e, scale in ((0, 4.0), (1, 1.0)):  # CE 1 -> 0.1 (SGD) or 0.2 (SAF)
                ce = {"sgd": 0.1, "saf": 0.2, "sgd_ls": 0.2}[m] * (10 if e == 0 else 1)
                rows += [(m, s, e, "lambda_max", v * scale), (m, s, e, "checkpoint_ce", ce)]
    curves = pd.DataFrame(rows, columns=["method", "seed", "epoch", "metric", "value"])
    temp = pd.DataFrame({"base": "sgd", "target": "saf", "seed": range(4),
                         "checkpoint_ce": 0.2, "lambda_max": sgd * 0.9})  # fmt: skip
    v = verdict_table(curves, temp, level=None, measures=("lambda_max",)).set_index("reference")
    last = v.loc["SGD, last epoch"]
    assert last.ratio == pytest.approx(math.exp(np.log(ratios).mean()), rel=1e-12)
    assert last.p == pytest.approx(stats.ttest_rel(np.log(sgd * ratios), np.log(sgd)).pvalue)
    assert last.ce_ratio == pytest.approx(2.0) and last.n == 4
    assert v.loc["SGD, temperature-matched"].ratio == pytest.approx(
        math.exp(np.log(ratios / 0.9).mean())
    )
    assert v.loc["SGD + label smoothing"].ce_ratio == pytest.approx(1.0)
    np.testing.assert_allclose(v.p_holm, holm(v.p.to_numpy()))
    assert len(verdict_display(v.reset_index())) == len(v)


def test_verdict_power_at_bonferroni_level():
    from figures._verdict import COLUMNS

    assert "seeds_needed" in COLUMNS
    # 24 headline cells: level 0.05/24 needs more seeds than 0.05 for the same effect
    assert seeds_for_power(1.0, 0.05 / 24) > seeds_for_power(1.0) == 10
    assert seeds_for_power(math.inf) == 2.0
