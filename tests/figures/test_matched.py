"""Matched-loss comparison against curves with a known answer (power laws), the refusal to
extrapolate, the log-axis bands, and the figures built on them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from figures import (
    at_loss,
    band_stats,
    common_loss_range,
    epoch_at_loss,
    matched_loss,
    matched_metrics,
    recipes,
)
from figures.report import matched_display, matched_findings

# Each method's sharpness is a power law of its training loss, v = a * loss**b, with its
# own a and b; each run's loss decays geometrically to its own final value.
LAWS = {"sgd": (2.0, 0.5), "sam": (1.0, 0.5), "saf": (3.0, 0.8), "mesa": (2.0, 1.2)}
FINAL = {"sgd": 1e-3, "sam": 2e-3, "saf": 5e-3, "mesa": 2e-2}


def _curves(seeds=(0, 1, 2), epochs=12, metrics=("lambda_max", "sam_sharpness")):
    rows = []
    for m, (a, b) in LAWS.items():
        for s in seeds:
            start = 2.0 * (1 + 0.1 * s)
            losses = np.geomspace(start, FINAL[m] * (1 + 0.05 * s), epochs)
            for e, x in enumerate(losses):
                rows.append((m, s, e, "checkpoint_ce", x))
                for k, metric in enumerate(metrics):
                    rows.append((m, s, e, metric, (k + 1) * a * x**b))
    return pd.DataFrame(rows, columns=["method", "seed", "epoch", "metric", "value"])


@pytest.mark.parametrize("b", [-1.5, -0.3, 0.5, 2.0])
def test_at_loss_is_exact_on_a_power_law(b):
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(1e-4, 3.0, 9))[::-1]  # decreasing, like training
    a = 1.7
    for level in np.geomspace(x.min(), x.max(), 17):
        assert at_loss(x, a * x**b, level) == pytest.approx(a * level**b, rel=1e-12)


def test_at_loss_refuses_to_extrapolate():
    x = np.array([1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="outside this run's range.*refusing to extrapolate"):
        at_loss(x, x, 0.005)
    with pytest.raises(ValueError, match="refusing to extrapolate"):
        at_loss(x, x, 2.0)
    assert at_loss(x, 3 * x, 0.01) == pytest.approx(0.03)  # the range's ends are inside
    assert at_loss(x, 3 * x, 1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="finite number > 0"):
        at_loss(x, x, 0.0)
    with pytest.raises(ValueError, match="no checkpoint"):
        at_loss([np.nan], [1.0], 1.0)


def test_at_loss_uses_the_latest_visit_of_a_level():
    # the loss goes down, back up past 0.5, then down again: the last crossing counts
    x = np.array([1.0, 0.25, 1.0, 0.25])
    y = np.array([1.0, 1.0, 8.0, 2.0])
    got = at_loss(x, y, 0.5)  # between (1.0, 8.0) and (0.25, 2.0): the log-log midpoint
    assert got == pytest.approx(4.0)


def test_at_loss_non_positive_values_interpolate_linearly_in_log_loss():
    x = np.array([1.0, 0.01])
    assert at_loss(x, np.array([-1.0, 1.0]), 0.1) == pytest.approx(0.0)


def test_common_range_is_the_lowest_loss_every_run_reaches():
    c = _curves()
    lo, hi = common_loss_range(c, ["lambda_max"])
    assert lo == pytest.approx(FINAL["mesa"] * 1.10)  # mesa seed 2 stops highest
    assert hi == pytest.approx(2.0)  # seed 0 starts lowest
    none = pd.DataFrame(
        [("a", 0, 0, "checkpoint_ce", 1.0), ("a", 0, 0, "lambda_max", 1.0),
         ("b", 0, 0, "checkpoint_ce", 0.1), ("b", 0, 0, "lambda_max", 1.0)],
        columns=["method", "seed", "epoch", "metric", "value"],
    )  # fmt: skip
    assert common_loss_range(none, ["lambda_max"]) is None
    assert matched_loss(none, ["lambda_max"]).empty


def test_matched_loss_recovers_each_power_law():
    c = _curves()
    m = matched_loss(c, ["lambda_max", "sam_sharpness"])
    lo = FINAL["mesa"] * 1.10
    assert sorted(m["level"].unique()) == pytest.approx([lo])  # the lowest common level
    for r in m.itertuples():
        a, b = LAWS[r.method]
        k = 1 if r.metric == "lambda_max" else 2
        assert r.value == pytest.approx(k * a * r.level**b, rel=1e-10)
    assert len(m) == 4 * 3 * 2  # methods x seeds x metrics: nobody is left out
    two = matched_loss(c, ["lambda_max"], levels=[lo, 10 * lo])
    assert len(two) == 4 * 3 * 2 and set(two["level"]) == {lo, 10 * lo}


def test_matched_loss_leaves_out_a_run_that_never_visits_the_level():
    c = _curves()
    m = matched_loss(c, ["lambda_max"], levels=[FINAL["sgd"] * 1.01])
    assert set(m["method"]) == {"sgd"} and len(m) == 1  # only sgd seed 0 gets that low


def test_matched_metrics_ratio_to_sgd_is_the_power_law_ratio():
    c = _curves(seeds=(0,))
    t = matched_metrics(c, ["lambda_max"])
    lo = t["level"].min()
    at = t[t.level == lo].set_index("method")
    for m, (a, b) in LAWS.items():
        want = a * lo**b / (LAWS["sgd"][0] * lo ** LAWS["sgd"][1])
        assert at.loc[m, "vs_sgd"] == pytest.approx(want, rel=1e-10)
    text = " ".join(matched_findings(t))
    assert f"{lo:.3g}" in text and "× SGD" in text and "never extrapolated" in text
    d = matched_display(t)
    assert list(d["method"][:4]) == ["SGD", "SAM", "SAF", "MESA"]


def test_epoch_at_loss_inverts_a_geometric_decay():
    c = _curves(epochs=12)
    ep = epoch_at_loss(c, 0.1).set_index(["method", "seed"])["epoch"]
    for (m, s), e in ep.items():
        start, end = 2.0 * (1 + 0.1 * s), FINAL[m] * (1 + 0.05 * s)
        # loss = start * (end / start) ** (epoch / 11): log-linear, so exact
        assert e == pytest.approx(11 * np.log(0.1 / start) / np.log(end / start))
    assert epoch_at_loss(c, 1e-9).empty
    text = " ".join(matched_findings(matched_metrics(c, ["lambda_max"]), c))
    assert "Epoch at which each method was at training CE" in text and "(of 11;" in text


def test_matched_findings_say_when_there_is_no_common_level():
    (line,) = matched_findings(matched_metrics(pd.DataFrame(columns=list(_curves().columns))))
    assert "share no training-loss level" in line


def test_log_bands_stay_positive_where_mean_minus_std_does_not():
    t = pd.DataFrame({"method": "sgd", "epoch": 0, "value": [0.01, 0.02, 10.0]})
    lin = band_stats(t, ["method", "epoch"]).iloc[0]
    assert lin["lo"] < 0  # the band that fell off the log axis
    log = band_stats(t, ["method", "epoch"], log=True).iloc[0]
    assert log["mean"] == pytest.approx(np.exp(np.log([0.01, 0.02, 10.0]).mean()))
    assert (log["lo"], log["hi"], log["n"]) == (0.01, 10.0, 3)


def test_log_panels_draw_positive_bands(tmp_path):
    rows = [("sgd", s, e, "lambda_max", v)
            for e in range(5) for s, v in enumerate((0.01, 0.02, 10.0))]  # fmt: skip
    fig_paths = recipes.hessian(pd.DataFrame(rows, columns=_curves().columns), tmp_path)
    assert fig_paths
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    recipes._curve_panel(ax, pd.DataFrame(rows, columns=_curves().columns), "lambda_max", "l", True)
    assert ax.get_yscale() == "log"
    (band,) = ax.collections
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    assert ys.min() == pytest.approx(0.01) and ys.max() == pytest.approx(10.0)
    plt.close(fig)


def test_sharpness_vs_loss_figure(tmp_path):
    c = _curves(metrics=("lambda_max", "trace", "sam_sharpness", "adaptive_sharpness"))
    paths = recipes.sharpness_vs_loss(c, tmp_path)
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    assert all(p.stat().st_size > 1000 for p in paths)
    again = recipes.sharpness_vs_loss(c, tmp_path / "again")
    assert paths[0].read_bytes() == again[0].read_bytes()  # same inputs, same bytes
    with pytest.raises(ValueError, match="checkpoint_ce"):
        recipes.sharpness_vs_loss(c[c.metric != "checkpoint_ce"], tmp_path)


def test_sweep_judged_at_the_same_training_ce(tmp_path):
    from figures._stages import _sweep_matched
    from figures.report import sweep_findings

    c = _curves()
    refs = c[c.method.isin(["sgd", "sam"])]
    table = pd.DataFrame(
        [(lam, lag, 0, 0.1 / lam, 10 / lam, 0.9, ce)
         for lam, ce in ((0.1, 0.01), (1.0, 0.1)) for lag in (1, 3)],
        columns=["lam", "lag", "seed", "sam_sharpness", "lambda_max", "test_acc",
                 "checkpoint_ce"],
    )  # fmt: skip
    t = _sweep_matched(table.copy(), refs)
    for r in t.itertuples():  # SGD's power law at each run's final CE, k=1 for lambda_max
        a, b = LAWS["sgd"]
        assert r.sgd_lambda_max_same_ce == pytest.approx(a * r.checkpoint_ce**b, rel=1e-10)
        assert r.sgd_sam_sharpness_same_ce == pytest.approx(2 * a * r.checkpoint_ce**b)
        a, b = LAWS["sam"]
        assert r.sam_lambda_max_same_ce == pytest.approx(a * r.checkpoint_ce**b, rel=1e-10)
    low = _sweep_matched(table.assign(checkpoint_ce=1e-6), refs)  # below every SGD run
    assert low["sgd_lambda_max_same_ce"].isna().all()
    final = pd.DataFrame({"method": ["SGD", "SAM"], "lambda_max_mean": [1.0, 0.5],
                          "sam_sharpness_mean": [1.0, 0.5]})  # fmt: skip
    text = " ".join(sweep_findings(t, final))
    assert "over SGD's at the same training CE (0.01 to 0.1)" in text
    assert "n/a" in " ".join(sweep_findings(low, final))
    c = pd.concat([c, c[c.metric == "lambda_max"].assign(metric="test_acc", value=0.9)])
    paths = recipes.sweep(t, c, tmp_path)
    assert {p.suffix for p in paths} == {".png", ".pdf"}


@pytest.mark.filterwarnings("ignore:Precision loss")  # equal ratios: sd ~ 1e-17
def test_sweep_paired_by_seed_and_against_tempered_references():
    """Seed s of SGD follows (1 + s) times the power law: the paired column is that seed's
    value, the mean column the mean over seeds; SAF at half its seed's SGD and a quarter of
    the tempered SGD gives paired ratios 0.5 and 0.25 with zero-width intervals."""
    from figures._stages import _sweep_matched
    from figures.report import sweep_findings

    c = _curves(seeds=(0, 1))
    refs = c[c.method.isin(["sgd", "sam"])].copy()
    scaled = refs.metric != "checkpoint_ce"
    refs.loc[scaled, "value"] *= 1 + refs.loc[scaled, "seed"]
    table = pd.DataFrame(
        [(lam, 1, s, 0.9, ce) for lam, ce in ((0.1, 0.01), (1.0, 0.1)) for s in (0, 1)],
        columns=["lam", "lag", "seed", "test_acc", "checkpoint_ce"],
    )
    a, b = LAWS["sgd"]
    law = a * table["checkpoint_ce"] ** b
    table["lambda_max"] = 0.5 * (1 + table["seed"]) * law
    table["sam_sharpness"] = table["lambda_max"]
    t = _sweep_matched(table, refs)
    assert t["sgd_lambda_max_same_ce_paired"].to_numpy() == pytest.approx(
        ((1 + t["seed"]) * law).to_numpy(), rel=1e-10
    )
    assert t["sgd_lambda_max_same_ce"].to_numpy() == pytest.approx(1.5 * law, rel=1e-10)
    for ref in ("sgd", "sam"):
        for k in ("lambda_max", "sam_sharpness"):
            t[f"{ref}_tempered_{k}"] = 4 * t[k]
    final = pd.DataFrame({"method": ["SGD", "SAM"], "lambda_max_mean": [1.0, 0.5],
                          "sam_sharpness_mean": [1.0, 0.5]})  # fmt: skip
    text = " ".join(sweep_findings(t, final))
    assert "SGD: lambda 0.1 lag 1: 0.50 [0.50, 0.50] (2 seeds); lambda 1 lag 1: 0.50" in text
    assert "tempered to SAF's final CE. SGD: lambda 0.1 lag 1: 0.25 [0.25, 0.25] (2 seeds)" in text


def test_levels_span_and_bracketing_checkpoints():
    from figures._results import bracketing_epochs, matched_levels

    rows = [(m, 0, e, "checkpoint_ce", v) for m, vs in (("a", [2.0, 0.3, 0.01]),
            ("b", [2.0, 0.5, 0.02])) for e, v in enumerate(vs)]  # fmt: skip
    c = pd.DataFrame(rows, columns=["method", "seed", "epoch", "metric", "value"])
    levels = matched_levels(c, n=3, span=10)
    assert levels == pytest.approx([0.02, 0.02 * 10**0.5, 0.2])  # from the lowest common CE
    # a's CE passes 0.2 between epochs 1 and 2, and 0.02 there too
    assert bracketing_epochs([0, 1, 2], [2.0, 0.3, 0.01], levels) == {1, 2}
    assert bracketing_epochs([0, 1, 2], [2.0, 0.3, 0.01], [1.0]) == {0, 1}
