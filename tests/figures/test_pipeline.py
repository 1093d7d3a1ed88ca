"""``saf figures --quick`` end to end (smaller still via hidden options), once per session."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cli import main
from figures import quick_settings, run_pipeline

TINY = [
    "--quick", "--seeds", "2", "--epochs", "2", "--analysis-samples", "128",
    "--surface-points", "5", "--interp-points", "5", "--m-values", "8,32", "--no-progress",
    "--sweep-lams", "1",
]  # fmt: skip
FIGURES = [
    "fig4a_train_ce",
    "fig4b_sam_sharpness",
    "hessian_per_epoch",
    "sharpness_vs_loss",
    "fig2_surfaces_2d",
    "surface_slices_1d",
    "interpolation_sgd_saf",
    "m_sharpness",
    "saf_sweep",
    "verdict",
    "matched_sensitivity",
    "sharpness_per_step",
    "flatness_vs_gap",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["figures", "--out", str(out), *TINY]) == 0
    return out


def test_every_file_exists(study):
    for name in FIGURES:
        for ext in (".png", ".pdf"):
            p = study / "figures" / f"{name}{ext}"
            assert p.is_file() and p.stat().st_size > 1000, p
    assert (study / "figures" / "fig2_surfaces_2d.html").is_file()
    assert "SAM sharpness" in (study / "tables" / "findings.md").read_text()
    for t in ("table3", "final_metrics"):
        assert (study / "tables" / f"{t}.csv").is_file() and (
            study / "tables" / f"{t}.md"
        ).is_file()
    assert (study / "index.html").is_file() and (study / "settings.json").is_file()
    leftovers = [p for p in study.rglob("*.tmp")]
    assert not leftovers, leftovers  # atomic writes leave no temporary files


def test_tables_have_every_method_and_seed(study):
    t = pd.read_csv(study / "tables" / "table3.csv")
    assert list(t.method) == ["SGD", "SAM", "SAF", "MESA"] and (t.seeds == 2).all()
    assert "speed_vs_sgd" not in t.columns  # runs one after another are no speed comparison
    store = t.set_index("method")["store_mb"]
    assert store["SGD"] == store["SAM"] == 0 and store["SAF"] > 0 and store["MESA"] > 0
    curves = pd.read_csv(study / "analysis" / "curves.csv")
    sharp = curves[curves.metric == "sam_sharpness"]
    # every checkpoint (epochs 0..2) of every run is analysed, the label-smoothing runs too
    assert len(sharp) == 5 * 2 * 3 and sharp["value"].notna().all()
    lam = curves[curves.metric == "lambda_max"]
    assert (lam["value"] > 0).all() and set(lam.epoch) >= {0, 2}


def test_controls_and_verdict(study):
    """The label-smoothing runs, the temperature-matched controls and the CI table."""
    curves = pd.read_csv(study / "analysis" / "curves.csv")
    assert set(curves[curves.method == "sgd_ls"].seed) == {0, 1}
    run = json.loads((study / "runs" / "sgd_ls-s0" / "run.json").read_text())
    assert run["method"] == "sgd" and 0 < run["config"]["label_smoothing"] < 1
    t = pd.read_csv(study / "tables" / "temperature_controls.csv")
    final = curves[(curves.metric == "checkpoint_ce") & (curves.epoch == 2)]
    ce = final.set_index(["method", "seed"])["value"]
    for r in t.itertuples():  # each control's CE is its target method's (float32 vs float64)
        assert r.checkpoint_ce == pytest.approx(ce[r.target, r.seed], abs=1e-4)
    assert {(b, m) for b, m in zip(t.base, t.target, strict=True)} == {
        ("sgd", "sam"),
        ("sgd", "saf"),
        ("sgd", "mesa"),
        ("sam", "saf"),
        ("sam", "mesa"),
    }
    v = pd.read_csv(study / "tables" / "verdict.csv")
    saf = v[(v.method == "saf") & (v.measure == "lambda_max")]
    assert any(r.startswith("SGD at matched CE") for r in saf.reference)
    assert {"SGD, last epoch", "SGD, temperature-matched", "SAM, temperature-matched",
            "SGD + label smoothing"} <= set(saf.reference)  # fmt: skip
    assert (v.lo <= v.ratio).all() and (v.ratio <= v.hi).all() and (v.p_holm >= v.p).all()
    page = (study / "index.html").read_text()
    assert page.index("Verdict") < page.index("Table 3") < page.index("What the numbers say")
    assert "saf figures --out" in page and "version" in page


def test_per_step_tracking_is_the_run_and_ends_at_its_final_hessian(study):
    """Each replay is bitwise its run; the threshold is 2(1+beta)/eta at the row's learning
    rate; the last row (the last step) is the final checkpoint's lambda_max on the probe."""
    import torch

    from analysis import hessian_eigenvalues, load_checkpoint
    from saf import list_checkpoints, load_dataset, model_from_run, read_run

    rows = {p.stem: pd.read_csv(p) for p in (study / "tracking").glob("*.csv")}
    assert sorted(rows) == sorted(
        f"{m}-s{k}" for m in ("sgd", "sam", "saf", "mesa") for k in (0, 1)
    )
    assert not list((study / "tracking").glob("*.replay"))  # replay folders removed
    for name, t in rows.items():
        assert t["replay_equal"].all(), name
        with np.errstate(divide="ignore"):  # the cosine schedule's last step has eta = 0
            limit = 2 * 1.9 / t["lr"].to_numpy()
        assert t["threshold"].to_numpy() == pytest.approx(limit, rel=1e-12)
        assert list(t["step"]) == list(range(4, 25, 4))  # 12 steps per epoch, 3 per epoch
        assert t["sam_edge"].notna().all() == name.startswith("sam")
    run_dir = study / "runs" / "saf-s1"
    model = load_checkpoint(model_from_run(read_run(run_dir)), list_checkpoints(run_dir)[-1][1])
    x, y, _ = load_dataset("digits", "train").get_batch(torch.arange(256))
    ref = hessian_eigenvalues(model.eval(), torch.nn.CrossEntropyLoss(), [(x, y)], tol=1e-6)
    assert rows["saf-s1"]["lambda_1"].iloc[-1] == pytest.approx(float(ref.values[0]), rel=2e-3)
    notes = (study / "tables" / "findings.md").read_text()
    assert "Per-step sharpness" in notes and "peak, over SGD's (paired seeds" in notes


def test_sweep_judged_like_the_main_runs(study):
    """SGD's Hessian is measured at both checkpoints around each sweep run's final CE; SGD
    and SAM tempered to that CE reach it (float32 vs float64); the findings say both."""
    from figures._results import bracketing_epochs

    t = pd.read_csv(study / "analysis" / "sweep.csv")
    curves = pd.read_csv(study / "analysis" / "curves.csv")
    bracketed = []
    for seed in (0, 1):  # a seed whose CE never falls to the sweep run's has no bracket
        ce = curves[(curves.method == "sgd") & (curves.seed == seed)]
        ce = ce[ce.metric == "checkpoint_ce"].sort_values("epoch")
        near = bracketing_epochs(ce.epoch, ce.value, t.checkpoint_ce)
        hess = pd.read_csv(study / "analysis" / f"sgd-s{seed}.hessian.csv")
        assert near <= set(hess[hess.metric == "lambda_max"].epoch)
        bracketed.append(bool(near))
    assert any(bracketed)
    paired = t.sgd_lambda_max_same_ce_paired
    assert (paired.notna() == [bracketed[s] for s in t.seed]).all()
    for r in t.itertuples():
        tempered = pd.read_csv(
            study / "analysis" / "sweep" / f"saf-lam1-lag{r.lag}-s0.tempered.csv"
        )
        assert set(tempered.base) == {"sgd", "sam"}
        assert tempered.checkpoint_ce.to_numpy() == pytest.approx(r.checkpoint_ce, abs=1e-4)
    assert (t.sgd_tempered_lambda_max > 0).all() and (t.sam_temperature > 0).all()
    assert t.lambda_max_over_sgd_tempered.to_numpy() == pytest.approx(
        (t.lambda_max / t.sgd_tempered_lambda_max).to_numpy()
    )
    text = (study / "tables" / "findings.md").read_text()
    assert "tempered to SAF's final CE. SGD: lambda 1 lag 1: " in text
    assert (study / "tables" / "sweep.csv").is_file()


def test_flatness_against_the_gap(study):
    t = pd.read_csv(study / "tables" / "flatness_vs_gap.csv")
    assert list(t.runs.unique()) == [
        "methods",
        "methods, within seeds",
        "methods + SGD label smoothing",
    ]
    assert set(t.measure) == {"lambda_max", "trace", "sam_sharpness"}
    assert (t[t.runs == "methods"].n_runs == 8).all() and (t.n_seeds == 2).all()
    assert t.spearman.between(-1, 1).all()
    assert (
        "Flatness against the generalization gap" in (study / "tables" / "findings.md").read_text()
    )


def test_store_memory_matches_closed_form(study):
    run = json.loads((study / "runs" / "saf-s0" / "run.json").read_text())
    n, c, lag = run["data"]["num_train"], run["data"]["num_classes"], run["hparams"]["lag"]
    t = pd.read_csv(study / "tables" / "table3.csv").set_index("method")
    # fp16 logits (2 bytes) + int32 epoch tag (4 bytes) per sample per slot
    assert t.loc["SAF", "store_mb"] * 2**20 == pytest.approx(lag * n * (2 * c + 4))


def test_report_renders(study, render_dom):
    dom, body = render_dom(study / "index.html")
    assert int(body["data-images-ok"]) == len(FIGURES)
    assert body["data-images-broken"] == "0"
    assert "Table 3" in dom and "Settings" in dom and "What the numbers say" in dom


def test_rerun_reuses_everything(study, capsys):
    ckpt = study / "runs" / "sgd-s0" / "checkpoints" / "epoch_0002.pt"
    cache = study / "analysis" / "sgd-s0.sam.csv"
    before = (ckpt.stat().st_mtime_ns, cache.read_bytes())
    assert main(["figures", "--out", str(study), *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("finished, reused") == 8 and "training" not in err.replace("[train", "")
    assert (ckpt.stat().st_mtime_ns, cache.read_bytes()) == before


def test_other_settings_in_same_folder_refused(study, capsys):
    args = [a if a != "2" else "3" for a in TINY]  # 3 seeds / 3 epochs
    assert main(["figures", "--out", str(study), *args]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_mode_default_settings(tmp_path):
    page = run_pipeline(quick_settings(), tmp_path, progress=False)
    assert page.is_file()


def test_export_reference_is_smaller_and_complete(study, tmp_path):
    from PIL import Image

    from figures import export_reference

    written = export_reference(study, tmp_path)
    pngs = [p for p in written if p.suffix == ".png"]
    assert sorted(p.stem for p in pngs) == sorted(FIGURES)
    for p in pngs:
        src = study / "figures" / p.name
        assert Image.open(p).size == Image.open(src).size
        assert p.stat().st_size < src.stat().st_size
    assert (tmp_path / "table3.md").read_text() == (study / "tables" / "table3.md").read_text()


def test_a_batchnorm_cnn_gets_every_figure_too(tmp_path):
    """The matched-loss figure (and the rest) for another architecture, not only the MLP."""
    out = tmp_path / "cnn"
    assert main(["figures", "--out", str(out), *TINY, "--model", "resnet_small"]) == 0
    for name in FIGURES:
        for ext in (".png", ".pdf"):
            assert (out / "figures" / f"{name}{ext}").stat().st_size > 0, name
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == "resnet_small"
    matched = pd.read_csv(out / "tables" / "matched_loss.csv")
    assert set(matched.method) == {"sgd", "sam", "saf", "mesa"}
