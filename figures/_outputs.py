"""The last stage of :func:`figures.pipeline.run_pipeline`: figures, tables and the report,
led by the verdict."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd

from analysis.io import atomic_write_json, atomic_write_text
from figures import _gap, _tracking, recipes
from figures._results import matched_levels
from figures._save import label, save_table
from figures._settings import Settings
from figures._stages import LS
from figures._verdict import matched_level, verdict_display, verdict_table
from figures.report import (
    Section,
    display_table,
    epoch_average_findings,
    findings,
    matched_display,
    matched_findings,
    matched_metrics,
    sweep_findings,
    write_final_table,
    write_report,
)
from saf import VERSION as saf_version
from saf import OutputStore, model_from_run, read_metrics, read_run, scaled_hparams

SPEED_NOTE = (
    "images/s is the trainer's per-epoch throughput (median over epochs). Runs execute one "
    "after another, so other load on the machine changes it: compare speed ratios only from "
    "an otherwise idle machine (see benchmarks/ for side-by-side measurements)."
)


# -- 6. outputs --------------------------------------------------------------------------


def runs_table(s: Settings, runs: dict) -> pd.DataFrame:
    """One row per run: final test accuracy, mean images/s and the method's store memory."""
    rows = []
    for (method, seed), run_dir in runs.items():
        m = read_metrics(run_dir)
        rows.append(
            {
                "method": method,
                "seed": seed,
                "test_acc": float(m["test_acc"].iloc[-1]),
                "images_per_s": float(m["images_per_s"].median()),
                "store_mb": _store_mb(read_run(run_dir)),
            }
        )
    return pd.DataFrame(rows)


def _store_mb(run: dict) -> float:
    """Extra memory the method keeps: SAF's output store, MESA's EMA weights, else 0 (MiB)."""
    if run["method"] == "saf":
        d = run["data"]
        store = OutputStore(d["num_train"], d["num_classes"], run["hparams"]["lag"], device="meta")
        return store.nbytes / 2**20
    if run["method"] == "mesa":
        sd = model_from_run(run).state_dict()
        return sum(t.numel() * t.element_size() for t in sd.values()) / 2**20
    return 0.0


LOG_BAND = "log axis: line = geometric mean, band = min-max over seeds; linear axis: mean ± 1 sd"
CAPTIONS = {
    "verdict": (
        "Geometric mean over seeds of the per-seed ratio method / reference, 95% t interval; "
        "filled: significant after Holm over the verdict table; dotted: 1 (as flat)."
    ),
    "sharpness_vs_loss": (
        "Thin lines: each seed's analysed checkpoints (dots); thick: geometric mean over seeds at "
        "common loss levels (log-log interpolation), band: min-max over seeds; dotted: the matched "
        "level of the verdict."
    ),
    "fig4a_train_ce": f"Per epoch, n seeds per method (legend title names the band: {LOG_BAND}).",
    "fig4b_sam_sharpness": f"Per epoch (legend title names the band: {LOG_BAND}).",
    "hessian_per_epoch": (
        f"Measured every few epochs (dots) and joined by lines; legend title names the band: "
        f"{LOG_BAND}."
    ),
    "matched_sensitivity": (
        "Per level: geometric mean over seeds of the per-seed ratio to SGD where both runs' "
        "training CE was that level, bars: 95% t interval; last panel: the learning rate at "
        "that CE, geometric mean and min-max over seeds. Hessians are measured at both "
        "checkpoints around each level."
    ),
    "sharpness_per_step": (
        "Each main run replayed with the sharpness monitor (bitwise the same run): Hessian "
        "lambda_max on the probe set; thin: each seed, thick: geometric mean over seeds; dashed: "
        "the momentum-SGD stability threshold 2(1+beta)/eta at the step's learning rate; dotted "
        "(SAM): SAM's edge, median over seeds; dash-dot: the trajectory loss starts."
    ),
    "fig2_surfaces_2d": "Seed 0 only, no band: one random filter-normalized plane shared by all.",
    "surface_slices_1d": "Seed 0 only, no band: the centre lines of the 2D surfaces.",
    "interpolation": "Seed 0 only, no band: the segment between two final models and beyond.",
    "m_sharpness": "Final models; line: mean over seeds, band: ± 1 sd (linear y axis).",
    "flatness_vs_gap": (
        "One point per final model (hollow: the label-smoothing control, left out of the "
        "titled rho); title: Spearman rho over the methods' runs, pooled and within seeds "
        "(less each seed's mean), 95% bootstrap interval resampling whole seeds; gap: test CE "
        "minus training CE, eval mode, last checkpoint."
    ),
    "saf_sweep": (
        "SAF runs: mean over the sweep's seeds (error bars ± 1 sd when more than one seed); "
        "SGD and SAM: mean ± 1 sd over the main seeds (dashed lines and shaded bands). Lower "
        "row: at each run's final CE, SGD's and SAM's measures interpolated between the two "
        "checkpoints around it (Hessians measured there); grey: over the same seed's final SGD "
        "model tempered to that CE."
    ),
}


def _trajectory_start(runs: dict) -> dict:
    """``{method: first step of the trajectory loss}`` for SAF and MESA (from seed 0's run)."""
    out = {}
    for (method, _), run_dir in runs.items():
        if method in ("saf", "mesa") and method not in out:
            hp = read_run(run_dir)["hparams"]
            out[method] = hp["start_epoch"] * hp["steps_per_epoch"]
    return out


def _sections(made: dict) -> list[Section]:
    out = []
    for title, paths in made.items():
        png = next(p for p in paths if p.suffix == ".png")
        cap = CAPTIONS.get(
            png.stem, CAPTIONS["interpolation"] if "interpolation" in png.stem else ""
        )
        out.append(Section(title, png, cap, [p for p in paths if p.suffix != ".png"]))
    return out


def write_outputs(
    s,
    out: Path,
    runs,
    curves,
    msharp,
    surfaces,
    interp,
    sweep,
    device,
    temperature,
    command,
    track=None,
) -> Path:
    """All figures, the tables and ``index.html`` (the verdict first)."""
    figs = out / "figures"
    a, b = interp["a"].iloc[0], interp["b"].iloc[0]
    main = curves[curves["method"] != LS]  # the control is not a method: no say in the level
    levels = matched_levels(main)
    v = verdict_table(curves, temperature, matched_level(main))
    save_table(v, out / "tables" / "verdict")
    key = {
        "Verdict: each method's flatness over SGD and over the controls": recipes.verdict(v, figs),
        "Sharpness against the training loss (matched-loss comparison)": (
            recipes.sharpness_vs_loss(curves, figs, level=matched_level(main))
        ),
    }
    if levels:
        key["Matched training loss: several levels, and the learning rate there"] = (
            recipes.matched_sensitivity(main, figs, levels)
        )
    made = {
        "Training cross-entropy (Fig. 4a)": recipes.training_ce(main, figs),  # LS: smoothed CE
        "SAM sharpness, rho = 0.05 (Fig. 4b)": recipes.sam_sharpness(curves, figs),
        "Hessian lambda_max and trace": recipes.hessian(curves, figs),
        "2D loss surfaces, shared colour scale (Figs. 2, 5)": recipes.surfaces_2d(surfaces, figs),
        "1D slices of the 2D surfaces": recipes.surface_slices(surfaces, figs),
        f"Interpolation {label(a)} -> {label(b)}": recipes.interpolation(interp, figs, a, b),
        "m-sharpness of the final models": recipes.m_sharpness(msharp, figs),
    }
    if track is not None and len(track):
        made["Sharpness per step against the stability threshold"] = _tracking.sharpness_per_step(
            track, figs, _trajectory_start(runs)
        )
    if len(sweep):
        made["Where SAF flattens: lambda and lag sweep"] = recipes.sweep(sweep, curves, figs)
        save_table(sweep, out / "tables" / "sweep")
    points, gap = _gap.gap_points(curves), _gap.gap_correlations(curves)
    save_table(gap, out / "tables" / "flatness_vs_gap")
    made["Flatness against the generalization gap"] = recipes.flatness_vs_gap(points, gap, figs)
    table, _ = recipes.table3(runs_table(s, runs), out / "tables")
    final = write_final_table(curves, out / "tables")
    matched = matched_metrics(main, levels=levels or None)
    save_table(matched, out / "tables" / "matched_loss")
    if len(temperature):
        save_table(temperature, out / "tables" / "temperature_controls")
    tables = {
        "Table 3 (test accuracy, throughput, memory)": table,
        "Final-epoch metrics (mean ± std over seeds)": display_table(final),
        "At matched training loss (mean ± std over seeds; ratio to SGD)": matched_display(matched),
    }

    steps = read_run(next(iter(runs.values())))["hparams"]["steps_per_epoch"]
    scaled = ("start_epoch", "lag", "ema_beta")
    hp = {k + " (scaled)" * (k in scaled): v for k, v in scaled_hparams(s.epochs, steps).items()}
    settings = {**s.key(), **hp, "steps_per_epoch": steps, "device": device}
    notes = (
        findings(final)
        + matched_findings(matched, main)
        + epoch_average_findings(curves)
        + (sweep_findings(sweep, final) if len(sweep) else [])
        + _gap.gap_findings(gap, points)
        + (_tracking.tracking_findings(track) if track is not None else [])
        + [SPEED_NOTE]
    )
    atomic_write_text(out / "tables" / "findings.md", "".join(f"- {n}\n" for n in notes))
    atomic_write_json(out / "tables" / "settings.json", settings)
    header = {"date": date.today().isoformat(), "version": saf_version, "command": command}
    return write_report(out, _sections(made), tables, settings, notes, verdict=verdict_display(v),
                        key=_sections(key), header=header)  # fmt: skip
