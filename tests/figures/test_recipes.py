"""Recipes on small synthetic tables: files written, shared scales, numbers in the tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from figures import recipes
from figures._results import Grid, mean_std, melt_metrics, metric_curves

METHODS = ("sgd", "sam", "saf", "mesa")


def _curves(seeds=(0, 1, 2), epochs=4) -> pd.DataFrame:
    rows = []
    for k, m in enumerate(METHODS):
        for s in seeds:
            for e in range(epochs):
                for metric in ("train_ce", "sam_sharpness", "lambda_max", "trace"):
                    rows.append((m, s, e, metric, (k + 1) * (1.0 + s) / (e + 1)))
    return pd.DataFrame(rows, columns=["method", "seed", "epoch", "metric", "value"])


def _surfaces(n=7) -> dict[str, Grid]:
    x = np.linspace(-1, 1, n)
    X, Y = np.meshgrid(x, x)
    return {m: Grid(x, x, 0.1 + (k + 1) * (X**2 + 2 * Y**2)) for k, m in enumerate(METHODS)}


def _assert_files(paths, suffixes=(".png", ".pdf")):
    for p in paths:
        assert p.is_file() and p.stat().st_size > 500, p
    assert {p.suffix for p in paths} >= set(suffixes)


def test_mean_std_matches_numpy():
    c = _curves()
    stats = metric_curves(c, "train_ce")
    row = stats[(stats.method == "sam") & (stats.epoch == 1)].iloc[0]
    v = np.array([2 * (1.0 + s) / 2 for s in (0, 1, 2)])
    assert row["mean"] == pytest.approx(v.mean())
    assert row["std"] == pytest.approx(v.std(ddof=1))
    assert row["n"] == 3


def test_mean_std_drops_nan_and_single_seed_std_is_zero():
    t = pd.DataFrame({"g": ["a", "a", "b"], "value": [1.0, np.nan, 5.0]})
    s = mean_std(t, ["g"]).set_index("g")
    assert s.loc["a", "n"] == 1 and s.loc["a", "std"] == 0.0 and s.loc["b", "mean"] == 5.0


def test_melt_metrics_round_trip():
    m = pd.DataFrame({"epoch": [0, 1], "train_ce": [2.0, 1.0], "test_acc": [0.5, 0.7]})
    long = melt_metrics(m, "saf", 3)
    assert len(long) == 4
    back = long.pivot(index="epoch", columns="metric", values="value")
    assert back.loc[1, "test_acc"] == 0.7 and set(long.seed) == {3}


def test_curve_recipes_write_png_pdf(tmp_path):
    c = _curves()
    _assert_files(recipes.training_ce(c, tmp_path))
    _assert_files(recipes.sam_sharpness(c, tmp_path))
    _assert_files(recipes.hessian(c, tmp_path))


def test_recipes_are_deterministic(tmp_path):
    c = _curves()
    a = recipes.sam_sharpness(c, tmp_path / "a")
    b = recipes.sam_sharpness(c, tmp_path / "b")
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_missing_metric_is_a_clear_error(tmp_path):
    c = _curves()
    with pytest.raises(ValueError, match="lambda_max"):
        recipes.hessian(c[c.metric != "lambda_max"], tmp_path)
    with pytest.raises(ValueError, match="columns"):
        recipes.training_ce(c.drop(columns="seed"), tmp_path)


def test_surfaces_share_one_colour_scale(tmp_path):
    s = _surfaces()
    levels = recipes._shared_levels(s)
    lo = np.log10(min(g.values.min() for g in s.values()))
    hi = np.log10(max(g.values.max() for g in s.values()))
    assert levels[0] == pytest.approx(lo) and levels[-1] == pytest.approx(hi)
    paths = recipes.surfaces_2d(s, tmp_path)
    _assert_files(paths, (".png", ".pdf", ".html"))
    assert (tmp_path / "plotly.min.js").stat().st_size > 100_000  # offline, no CDN
    html = (tmp_path / "fig2_surfaces_2d.html").read_text()
    assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html
    _assert_files(recipes.surface_slices(s, tmp_path))


def test_grid_center_slices_and_shape_check():
    x = np.linspace(-1, 1, 5)
    g = Grid(x, x, np.add.outer(10 * x, x))  # values[i, j] = 10 y_i + x_j
    along_x, along_y = g.center_slices()
    np.testing.assert_allclose(along_x, x)
    np.testing.assert_allclose(along_y, 10 * x)
    with pytest.raises(ValueError, match="shape"):
        Grid(x, x[:3], np.zeros((5, 5)))


def test_interpolation_and_m_sharpness(tmp_path):
    a = np.linspace(-0.5, 1.5, 9)
    interp = pd.concat(
        pd.DataFrame({"alpha": a, "split": sp, "loss": 0.1 + (a - 0.5) ** 2 + k, "accuracy": 0.9})
        for k, sp in enumerate(("train", "test"))
    )
    _assert_files(recipes.interpolation(interp, tmp_path))
    ms = pd.DataFrame(
        [
            (m, s, mm, 0.01 * k * mm)
            for k, m in enumerate(METHODS)
            for s in (0, 1)
            for mm in (1, 4, 16)
        ],
        columns=["method", "seed", "m", "value"],
    )
    _assert_files(recipes.m_sharpness(ms, tmp_path))


def test_table3_numbers(tmp_path):
    runs = pd.DataFrame(
        {
            "method": ["sgd", "sgd", "sam", "sam", "saf", "saf"],
            "seed": [0, 1, 0, 1, 0, 1],
            "test_acc": [0.90, 0.92, 0.93, 0.95, 0.94, 0.94],
            "images_per_s": [1000.0, 1000.0, 500.0, 520.0, 980.0, 960.0],
            "store_mb": [0.0, 0.0, 0.0, 0.0, 1.5, 1.5],
        }
    )
    t, paths = recipes.table3(runs, tmp_path)
    assert list(t.method) == ["SGD", "SAM", "SAF"]
    sam = t.set_index("method").loc["SAM"]
    assert sam.test_acc_mean == pytest.approx(94.0)
    assert sam.test_acc_std == pytest.approx(np.std([93.0, 95.0], ddof=1), abs=0.005)
    assert sam.images_per_s == 510 and "speed_vs_sgd" not in t  # no ratio of sequential runs
    md = (tmp_path / "table3.md").read_text()
    assert md.count("\n") == 2 + 3 and "94.00 ± 1.41" in md
    back = pd.read_csv(tmp_path / "table3.csv")
    assert back.shape == t.shape


def test_sweep_figure(tmp_path):
    table = pd.DataFrame(
        [
            (lam, lag, s, 0.1 / lam, 10 / lam, 0.9)
            for lam in (0.1, 1.0)
            for lag in (1, 3)
            for s in (0, 1)
        ],
        columns=["lam", "lag", "seed", "sam_sharpness", "lambda_max", "test_acc"],
    )
    c = _curves()
    c = pd.concat([c, c[c.metric == "train_ce"].assign(metric="test_acc", value=0.9)])
    _assert_files(recipes.sweep(table, c, tmp_path))
