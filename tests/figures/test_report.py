"""The report page: final-metric tables, findings in numbers, and rendering in chromium."""

from __future__ import annotations

import pandas as pd
import pytest

from figures import recipes
from figures.report import Section, final_metrics, findings, write_report
from tests.figures.test_recipes import _curves


def test_final_metrics_uses_last_epoch_per_run():
    c = _curves(epochs=4)
    f = final_metrics(c).set_index("method")
    # value = (k+1)(1+s)/(e+1) at e=3 for SAM (k=1): 2(1+s)/4 over s=0,1,2 -> mean 1.0
    assert f.loc["SAM", "train_ce_mean"] == pytest.approx(1.0)
    assert f.loc["SAM", "seeds"] == 3
    assert list(f.index) == ["SGD", "SAM", "SAF", "MESA"]


def test_findings_state_ratios_to_sgd():
    c = _curves(epochs=2)
    lines = findings(final_metrics(c))
    sharp = next(s for s in lines if "SAM sharpness" in s)
    # SAF is method k=2: three times SGD's value at every epoch and seed
    assert "SAF" in sharp and "(3.00× SGD)" in sharp


def test_epoch_average_findings_ratio():
    from figures.report import epoch_average_findings

    lines = epoch_average_findings(_curves(epochs=3))
    # MESA (k=3) is 4x SGD at every epoch and seed, so 4x on average
    assert any("lambda_max averaged" in s and "MESA" in s and "(4.00× SGD)" in s for s in lines)


def test_report_renders_in_headless_chromium(tmp_path, render_dom):
    c = _curves()
    figs = tmp_path / "figures"
    paths = recipes.training_ce(c, figs) + recipes.sam_sharpness(c, figs)
    pngs = [p for p in paths if p.suffix == ".png"]
    sections = [Section(p.stem, p, "caption", [p.with_suffix(".pdf")]) for p in pngs]
    table = pd.DataFrame({"method": ["SGD"], "acc": [0.5]})
    page = write_report(tmp_path, sections, {"Table 3": table}, {"seeds": 3}, ["a note"])
    dom, body = render_dom(page)
    assert body.get("data-images-ok") == str(len(pngs)), body
    assert body.get("data-images-broken") == "0"
    assert "Table 3" in dom and "a note" in dom and "seeds" in dom
