"""The stages of :func:`figures.pipeline.run_pipeline`, each cached on disk."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis import (
    AnalysisSettings,
    analyze_run,
    hessian_eigenvalues,
    load_checkpoint,
    load_state_dict,
    m_sharpness,
    sam_sharpness,
)
from analysis.io import atomic_write_text
from figures._controls import mean_ce, smoothing_for_ce, temperature_matched
from figures._results import (
    CURVE_COLUMNS,
    Grid,
    bracketing_epochs,
    matched_levels,
    matched_loss,
    melt_metrics,
)
from figures._save import label
from figures._settings import Settings, run_name, say
from landscape import (
    Surface,
    interpolation_directions,
    random_direction,
    surface_1d,
    surface_2d,
)
from saf import (
    DEFAULT_RHO,
    TrainConfig,
    data_batches,
    list_checkpoints,
    load_dataset,
    model_from_run,
    read_metrics,
    read_run,
    scaled_hparams,
    steps_per_epoch,
    train,
)

LOSS = nn.CrossEntropyLoss()
LS = "sgd_ls"  # label-smoothing SGD, the smoothing chosen per seed for SAF's final CE


def _csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))


def _data(s: Settings, split: str, limit: int | None, device: str, batch_size: int = 256):
    return data_batches(s.data, split, batch_size, limit, s.data_dir, device)


# -- 1. training -------------------------------------------------------------------------


def train_config(
    s: Settings, method: str, seed: int, run_dir: Path, device: str, progress: bool, **over
):
    """The trainer's config for one run: the same settings for every method and seed.

    ``over`` replaces scaled hyperparameters (``lam``, ``lag``) for the sweep only; a sweep
    lag keeps E_start >= lag as the paper does (5 >= 3), so no epoch of the
    run has a trajectory term with no target.
    """
    n = len(load_dataset(s.data, "train", s.data_dir))
    h = scaled_hparams(s.epochs, steps_per_epoch(n, s.batch_size))
    lam = {"saf": h["saf_lambda"], "mesa": h["mesa_lambda"]}.get(method)
    kwargs = dict(
        method=method,
        model=s.model,
        model_kwargs=dict(s.model_kwargs),
        data=s.data,
        data_dir=s.data_dir,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        rho=h["rho"] if method == "sam" else None,
        lam=lam,
        tau=h["tau"],
        lag=h["lag"],
        start_epoch=h["start_epoch"],
        ema_decay=h["ema_beta"] if method == "mesa" else None,
        seed=seed,
        device=device,
        out=str(run_dir),
        progress=progress,
        threads=torch.get_num_threads(),
    )
    if "lag" in over:
        kwargs["start_epoch"] = max(h["start_epoch"], over["lag"])
    return TrainConfig(**{**kwargs, **over})


def _finished(run_dir: Path, epochs: int) -> bool:
    m = read_metrics(run_dir)
    return len(m) > 0 and int(m["epoch"].max()) >= epochs


def train_all(s: Settings, out: Path, device: str, progress: bool) -> dict[tuple[str, int], Path]:
    """Train every method x seed; skip finished runs, resume unfinished ones."""
    runs = {}
    todo = [(m, k) for m in s.methods for k in range(s.seeds)]
    for i, (method, seed) in enumerate(todo, 1):
        run_dir = out / "runs" / run_name(method, seed)
        runs[method, seed] = run_dir
        if _finished(run_dir, s.epochs):
            say(f"[train {i}/{len(todo)}] {run_dir.name}: finished, reused")
            continue
        resume = (run_dir / "state.pt").is_file()
        say(f"[train {i}/{len(todo)}] {run_dir.name}: {'resuming' if resume else 'training'}")
        train(train_config(s, method, seed, run_dir, device, progress), resume=resume)
    return runs


# -- 2. analysis per checkpoint ------------------------------------------------------------


def _model_factory(run_dir: Path):
    run = read_run(run_dir)
    return lambda: model_from_run(run)


# What the figures measure, and how (analysis.analyze_run's settings). Every checkpoint:
# its training cross-entropy (eval mode, the analysed samples; "loss" is renamed
# checkpoint_ce), the one-step SAM sharpness (rho = 0.05) and the adaptive (ASAM-scaled,
# rho = 0.5, the ASAM paper's CIFAR radius) one-step sharpness, which a rescaling of the
# weights before a BatchNorm leaves unchanged; every `hessian_every` epochs and at the
# last: the Hessian's lambda_max and trace.
SHARPNESS = ["loss", "sam_sharpness"]
HESSIAN = ["lambda_max", "trace"]
ANALYSIS = AnalysisSettings(sam_rho=0.05, tol=1e-3, trace_matvecs=30)
ADAPTIVE = AnalysisSettings(tol=1e-3, trace_matvecs=30, rho=DEFAULT_RHO["asam"], m=None,
                            adaptive=True)  # fmt: skip
RENAME = {"loss": "checkpoint_ce", "m_sharpness": "adaptive_sharpness"}
MATCHED = ["lambda_max", "trace", "sam_sharpness", "adaptive_sharpness"]


def analyse_checkpoints(
    run_dir: Path,
    metrics: list[str],
    epochs: list[int] | None,
    data,
    csv: Path,
    device: str,
    progress: bool,
    settings: AnalysisSettings = ANALYSIS,
) -> pd.DataFrame:
    """``analysis.analyze_run`` on some of a run's checkpoints: rows ``epoch, metric, value,
    stderr`` (metrics named as in the curves, :data:`RENAME`), cached per checkpoint beside
    ``csv`` (resumable, also after SIGKILL)."""
    df = analyze_run(
        run_dir, metrics, model_factory=_model_factory(run_dir), data=data, epochs=epochs,
        settings=settings, out=csv, device=device, progress=progress,
    )  # fmt: skip
    return df[["epoch", "metric", "value", "stderr"]].replace({"metric": RENAME})


def _sharpness_of(run_dir: Path, data, folder: Path, device: str, progress: bool):
    """Training CE, SAM and adaptive sharpness of every checkpoint."""
    one = functools.partial(analyse_checkpoints, run_dir, data=data, device=device,
                            progress=progress)  # fmt: skip
    return pd.concat(
        [
            one(SHARPNESS, None, csv=folder / f"{run_dir.name}.sam.csv"),
            one(
                ["m_sharpness"],
                None,
                csv=folder / f"{run_dir.name}.adaptive.csv",
                settings=ADAPTIVE,
            ),  # fmt: skip
        ],
        ignore_index=True,
    )


def _hessian_of(s: Settings, run_dir: Path, sharp, levels, data, folder, device, progress):
    """Hessian lambda_max and trace every ``hessian_every`` epochs, at the last, and at both
    checkpoints around each matched level (:func:`figures._results.bracketing_epochs`, from
    the run's per-epoch training CE in ``sharp``), so a matched value is interpolated between
    neighbouring epochs, not across ``hessian_every`` of them. ``levels`` None: the last
    checkpoint only (the label-smoothing control, which the verdict compares at the end)."""
    ce = sharp[sharp["metric"] == "checkpoint_ce"].sort_values("epoch")
    near = bracketing_epochs(ce["epoch"], ce["value"], levels) if levels is not None else set()
    every = s.hessian_every if levels is not None else s.epochs + 1  # None: the last only
    epochs = [e for e, _ in list_checkpoints(run_dir)
              if e % every == 0 or e == s.epochs or e in near]  # fmt: skip
    csv = folder / f"{run_dir.name}.hessian.csv"
    return analyse_checkpoints(run_dir, HESSIAN, epochs, data, csv, device, progress)


def analyse_run(
    s: Settings, run_dir: Path, data, folder: Path, device: str, progress: bool, levels=()
):
    """Training CE, SAM and adaptive sharpness of every checkpoint; Hessian lambda_max and
    trace of some (:func:`_hessian_of`)."""
    sharp = _sharpness_of(run_dir, data, folder, device, progress)
    hess = _hessian_of(s, run_dir, sharp, levels, data, folder, device, progress)
    return pd.concat([sharp, hess], ignore_index=True)


def analyse_all(s: Settings, out: Path, runs: dict, device: str, progress: bool) -> pd.DataFrame:
    """Training CE, SAM and adaptive sharpness every epoch; then the matched levels
    (:func:`figures._results.matched_levels` of the methods' runs, not the control's) and
    Hessian lambda_max and trace every ``hessian_every`` epochs and around each level
    (:func:`_hessian_of`; the label-smoothing control's at its last epoch only); and the
    trainer's metrics."""
    data = _data(s, "train", s.analysis_samples, device, batch_size=s.batch_size)
    folder = out / "analysis"
    sharp = {}
    for i, ((method, seed), run_dir) in enumerate(runs.items(), 1):
        say(f"[analyse {i}/{len(runs)}] {run_dir.name}")
        df = _sharpness_of(run_dir, data, folder, device, progress)
        sharp[method, seed] = df.assign(method=method, seed=seed)[list(CURVE_COLUMNS)]
    levels = matched_levels(pd.concat([v for (m, _), v in sharp.items() if m != LS]))
    parts = []
    for i, ((method, seed), run_dir) in enumerate(runs.items(), 1):
        say(f"[hessian {i}/{len(runs)}] {run_dir.name}")
        lv = None if method == LS else levels
        df = _hessian_of(s, run_dir, sharp[method, seed], lv, data, folder, device, progress)
        parts += [sharp[method, seed], df.assign(method=method, seed=seed)[list(CURVE_COLUMNS)]]
        parts.append(melt_metrics(read_metrics(run_dir), method, seed))
    curves = pd.concat(parts, ignore_index=True)
    _csv(curves, out / "analysis" / "curves.csv")
    return curves


# -- 3. m-sharpness of the final models ------------------------------------------------------


def _final_model(run_dir: Path, device: str) -> nn.Module:
    model = load_checkpoint(_model_factory(run_dir)(), list_checkpoints(run_dir)[-1][1])
    return model.to(device).eval()


def m_sharpness_all(s: Settings, out: Path, runs: dict, device: str, progress: bool):
    """m-sharpness (rho=0.05) of each final model for each m (cached CSV)."""
    path = out / "analysis" / "m_sharpness.csv"
    if path.is_file():
        return pd.read_csv(path)
    say("m-sharpness of the final models")
    data = _data(s, "train", s.analysis_samples, device, batch_size=max(s.m_values))
    rows = []
    for (method, seed), run_dir in runs.items():
        model = _final_model(run_dir, device)
        for m in s.m_values:
            r = m_sharpness(model, LOSS, data, rho=0.05, m=m, device=device, progress=False)
            rows.append((method, seed, m, r.value))
    df = pd.DataFrame(rows, columns=["method", "seed", "m", "value"])
    _csv(df, path)
    return df


# -- 3b. controls: the same final CE without SAF -------------------------------------------

CONTROL_MEASURES = ["lambda_max", "sam_sharpness"]


def smoothing_runs(s: Settings, out: Path, runs: dict, device: str, progress: bool) -> dict:
    """Train label-smoothing SGD per seed (``runs/sgd_ls-s<k>``), the control for SAF.

    The rule (cheap: one run per seed): the smoothing whose CE floor
    (:func:`figures._controls.smoothing_for_ce`) is the training CE that SAF seed k adds
    over SGD seed k at the end (eval mode, the analysed samples). A finite run ends above its
    floor by about what plain SGD leaves, so the run should end near SAF's CE; the verdict
    shows how near (its ``ce_ratio``). No runs without SGD and SAF, nor for a seed where
    SAF ends at a lower CE than SGD.
    """
    if not {"sgd", "saf"} <= set(s.methods):
        return {}
    data = _data(s, "train", s.analysis_samples, device, batch_size=s.batch_size)
    k = load_dataset(s.data, "train", s.data_dir).num_classes
    done = {}
    for seed in range(s.seeds):
        run_dir = out / "runs" / run_name(LS, seed)
        if not _finished(run_dir, s.epochs):
            ce = [mean_ce(_final_model(runs[m, seed], device), data) for m in ("saf", "sgd")]
            if ce[0] <= ce[1]:
                say(f"[control] {run_dir.name}: none (SAF's final CE is not above SGD's)")
                continue
            floor = ce[0] - ce[1]
            ls = smoothing_for_ce(floor, k)
            say(f"[control] {run_dir.name}: SGD, label smoothing {ls:.3g} (CE floor {floor:.3g})")
            cfg = train_config(s, "sgd", seed, run_dir, device, progress, label_smoothing=ls)
            train(cfg, resume=(run_dir / "state.pt").is_file())
        done[LS, seed] = run_dir
    return done


def temperature_controls(s: Settings, out: Path, runs: dict, device: str) -> pd.DataFrame:
    """SGD's and SAM's final models with the last layer divided by the T that gives each other
    method's final training CE (same seed; :func:`figures._controls.temperature_matched`),
    and their lambda_max and SAM sharpness (rho = 0.05), measured as in the curves.

    Rows ``base, target, seed, temperature, checkpoint_ce, lambda_max, sam_sharpness``
    (cached in ``analysis/temperature.csv``).
    """
    path = out / "analysis" / "temperature.csv"
    if path.is_file():
        return pd.read_csv(path)
    data = _data(s, "train", s.analysis_samples, device, batch_size=s.batch_size)
    pairs = [(b, t) for b in ("sgd", "sam") for t in s.methods if t not in ("sgd", b)]
    rows = []
    for base, target in [(b, t) for b, t in pairs if b in s.methods]:
        say(f"[control] {label(base)} at {label(target)}'s final CE (temperature)")
        for seed in range(s.seeds):
            ce = mean_ce(_final_model(runs[target, seed], device), data)
            model = _final_model(runs[base, seed], device)
            rows.append((base, target, seed, *_tempered(model, data, ce)))
    cols = ["base", "target", "seed", "temperature", "checkpoint_ce", *CONTROL_MEASURES]
    df = pd.DataFrame(rows, columns=cols)
    _csv(df, path)
    return df


def _tempered(model: nn.Module, data, ce: float) -> tuple[float, float, float, float]:
    """``(T, training CE, lambda_max, SAM sharpness)`` of ``model`` with its last layer divided
    by the T that gives training CE ``ce`` (:func:`figures._controls.temperature_matched`),
    measured as in the curves (:data:`ANALYSIS`)."""
    scaled, t = temperature_matched(model, data, ce)
    lam = hessian_eigenvalues(scaled, LOSS, data, tol=ANALYSIS.tol).values[0]
    sharp = sam_sharpness(scaled, LOSS, data, rho=ANALYSIS.sam_rho).value
    return t, mean_ce(scaled, data), float(lam), sharp


# -- 4. surfaces -------------------------------------------------------------------------


def surfaces_all(s: Settings, out: Path, runs: dict, device: str, progress: bool) -> dict:
    """2D surfaces of the seed-0 final models; the same Gaussian draw for every method."""
    data = _data(s, "train", s.analysis_samples, device)
    xs = np.linspace(-s.surface_span, s.surface_span, s.surface_points)
    grids = {}
    for method in s.methods:
        path = out / "surfaces" / f"{run_name(method, 0)}.npz"
        if path.is_file() and Surface.load(path).complete:
            surf = Surface.load(path)
        else:
            say(f"2D surface of {run_name(method, 0)} ({s.surface_points}x{s.surface_points})")
            model = _final_model(runs[method, 0], device)
            dirs = (random_direction(model, index=0), random_direction(model, index=1))
            surf = surface_2d(model, LOSS, data, dirs, xs, xs, path=path, progress=progress)
        grids[method] = Grid(surf.coords[0], surf.coords[1], np.asarray(surf.loss).T)
    return grids


def interpolation(s: Settings, out: Path, runs: dict, device: str, progress: bool):
    """Train and test loss along the line from the SGD to the SAF minimum (seed 0)."""
    a, b = ("sgd", "saf") if {"sgd", "saf"} <= set(s.methods) else s.methods[:2]
    path = out / "analysis" / f"interpolation_{a}_{b}.csv"
    if path.is_file():
        return pd.read_csv(path)
    say(f"interpolation {label(a)} -> {label(b)}")
    start = load_state_dict(_last(runs[a, 0]))
    end = load_state_dict(_last(runs[b, 0]))
    (d,) = interpolation_directions(start, end)
    model = _final_model(runs[a, 0], device)
    alphas = np.linspace(-0.5, 1.5, s.interp_points)
    rows = []
    for split, limit in (("train", s.analysis_samples), ("test", None)):
        data = _data(s, split, limit, device)
        surf = surface_1d(model, LOSS, data, d, alphas, origin=start, progress=progress)
        rows.append(
            pd.DataFrame(
                {"alpha": alphas, "split": split, "loss": surf.loss, "accuracy": surf.accuracy}
            )
        )
    df = pd.concat(rows, ignore_index=True).assign(a=a, b=b)
    _csv(df, path)
    return df


def _last(run_dir: Path) -> Path:
    return list_checkpoints(run_dir)[-1][1]


# -- 5. sweep of SAF's lambda and lag ------------------------------------------------------


def sweep(s: Settings, out: Path, curves: pd.DataFrame, device: str, progress: bool):
    """SAF for each (lambda, lag): final training CE, SAM sharpness, lambda_max and test
    accuracy, judged like the main runs against SGD and SAM at that final CE (a stronger SAF
    stops at a higher loss, so it is judged against the baselines there), two ways:

    * **same CE** (:func:`_sweep_matched`): the reference's measure where its training CE
      was the sweep run's final CE, interpolated between the two checkpoints around it, where
      its Hessian is measured too (:func:`_sweep_references`);
    * **temperature-matched** (:func:`_sweep_tempered`): the same seed's final SGD (SAM)
      model with its last layer rescaled to the sweep run's final CE.

    Cost beyond the sweep runs' own analysis: at most 2 Hessians per sweep run for each SGD
    and SAM run (the checkpoints around its final CE; fewer where the levels share a bracket
    or the checkpoint was measured already), and 2 Hessians and 2 SAM sharpness values per
    sweep run for the tempered models. All are cached (per checkpoint, and per sweep run in
    ``analysis/sweep/<run>.tempered.csv``), so a rerun computes only what is missing.

    Every checkpoint of a sweep run is analysed like the main runs (:func:`analyse_run`);
    the trajectories are kept in ``analysis/sweep_curves.csv``.
    """
    path = out / "analysis" / "sweep.csv"
    if path.is_file() and set(SWEEP_NEWEST) <= set(pd.read_csv(path, nrows=0).columns):
        return pd.read_csv(path)
    data = _data(s, "train", s.analysis_samples, device, batch_size=s.batch_size)
    grid = [
        (lam, lag, k) for lam in s.sweep_lams for lag in s.sweep_lags for k in range(s.sweep_seeds)
    ]
    rows, parts = [], []
    for i, (lam, lag, seed) in enumerate(grid, 1):
        say(f"[sweep {i}/{len(grid)}] {_sweep_dir(out, lam, lag, seed).name}")
        row, df = _sweep_run(s, out, lam, lag, seed, data, device, progress)
        rows.append(row)
        parts.append(df)
    _csv(pd.concat(parts, ignore_index=True), out / "analysis" / "sweep_curves.csv")
    table = pd.DataFrame(rows)
    refs = _sweep_references(s, out, curves, table["checkpoint_ce"], data, device, progress)
    table = _sweep_tempered(s, out, _sweep_matched(table, refs), data, device)
    _csv(table, path)
    return table


SWEEP_MEASURES = ["sam_sharpness", "lambda_max"]
SWEEP_NEWEST = ["sgd_lambda_max_same_ce_paired", "sgd_tempered_lambda_max"]  # else: recompute


def _sweep_dir(out: Path, lam: float, lag: int, seed: int) -> Path:
    return out / "sweep" / f"saf-lam{lam:g}-lag{lag}-s{seed}"


def _sweep_run(s: Settings, out: Path, lam, lag, seed, data, device, progress):
    """Train (or reuse) one sweep run and analyse it: ``(its final row, its curves)``."""
    run_dir = _sweep_dir(out, lam, lag, seed)
    if not _finished(run_dir, s.epochs):
        cfg = train_config(s, "saf", seed, run_dir, device, progress, lam=lam, lag=lag)
        train(cfg, resume=(run_dir / "state.pt").is_file())
    df = analyse_run(s, run_dir, data, out / "analysis" / "sweep", device, progress)
    final = df[df["epoch"] == s.epochs]
    acc = float(read_metrics(run_dir)["test_acc"].iloc[-1])
    row = {"lam": lam, "lag": lag, "seed": seed, "test_acc": acc,
           **dict(zip(final["metric"], final["value"], strict=True))}  # fmt: skip
    return row, df.assign(method=f"lam{lam:g}-lag{lag}", seed=seed)[list(CURVE_COLUMNS)]


def _sweep_references(s: Settings, out: Path, curves, levels, data, device, progress):
    """SGD's and SAM's curves with their Hessians also at both checkpoints around each of
    ``levels`` (:func:`_hessian_of` at the main matched levels and these, so each run's
    Hessian file keeps every epoch it had; only the new checkpoints are computed)."""
    main = matched_levels(curves[curves["method"] != LS])
    parts = []
    for ref in [m for m in ("sgd", "sam") if m in s.methods]:
        say(f"[sweep] {label(ref)}'s Hessians around the sweep runs' final training CEs")
        for seed in range(s.seeds):
            c = curves[(curves["method"] == ref) & (curves["seed"] == seed)]
            run_dir = out / "runs" / run_name(ref, seed)
            h = _hessian_of(s, run_dir, c, [*main, *levels], data, out / "analysis", device,
                            progress)  # fmt: skip
            parts += [c[~c["metric"].isin(HESSIAN)], h.assign(method=ref, seed=seed)]
    return pd.concat(parts, ignore_index=True)[list(CURVE_COLUMNS)] if parts else curves[:0]


def _sweep_matched(table: pd.DataFrame, refs: pd.DataFrame) -> pd.DataFrame:
    """``<ref>_<measure>_same_ce`` (mean over the reference's seeds) and
    ``<ref>_<measure>_same_ce_paired`` (the sweep run's own seed) for ref SGD and SAM: the
    reference's measure where its training CE equalled this sweep run's final CE
    (:func:`figures._results.matched_loss`; NaN where no seed was ever at that loss)."""
    for ref in ("sgd", "sam"):
        r = refs[refs["method"] == ref]
        for k in SWEEP_MEASURES:
            at = [_at_ce(r, k, float(level)) for level in table["checkpoint_ce"]]
            table[f"{ref}_{k}_same_ce"] = [float(a.mean()) if len(a) else np.nan for a in at]
            table[f"{ref}_{k}_same_ce_paired"] = [
                float(a.get(seed, np.nan)) for a, seed in zip(at, table["seed"], strict=True)
            ]
    return table


def _at_ce(ref: pd.DataFrame, k: str, level: float) -> pd.Series:
    """The reference's runs' ``k`` at training CE ``level``, indexed by seed."""
    m = matched_loss(ref, [k], [level]) if len(ref) else pd.DataFrame(columns=["seed", "value"])
    return m.set_index("seed")["value"]


def _sweep_tempered(s: Settings, out: Path, table: pd.DataFrame, data, device) -> pd.DataFrame:
    """``<ref>_temperature``, ``<ref>_tempered_<measure>`` and ``<measure>_over_<ref>_tempered``
    for ref SGD and SAM: the same seed's final reference model with its last layer rescaled
    to this sweep run's final training CE (:func:`_tempered`); NaN where the reference has no
    such seed or no temperature reaches that CE."""
    per_run = [_tempered_refs(s, out, r, data, device) for r in table.itertuples()]
    for ref in ("sgd", "sam"):
        got = [p.get(ref, {}) for p in per_run]
        table[f"{ref}_temperature"] = [g.get("temperature", np.nan) for g in got]
        for k in SWEEP_MEASURES:
            table[f"{ref}_tempered_{k}"] = [g.get(k, np.nan) for g in got]
            table[f"{k}_over_{ref}_tempered"] = table[k] / table[f"{ref}_tempered_{k}"]
    return table


def _tempered_refs(s: Settings, out: Path, row, data, device) -> dict:
    """``{ref: {temperature, checkpoint_ce, lambda_max, sam_sharpness}}`` of SGD and SAM
    tempered to one sweep run's final CE (cached in ``analysis/sweep/<run>.tempered.csv``)."""
    run_dir = _sweep_dir(out, row.lam, row.lag, row.seed)
    path = out / "analysis" / "sweep" / f"{run_dir.name}.tempered.csv"
    if not path.is_file():
        ce = mean_ce(_final_model(run_dir, device), data)
        rows = []
        for ref in [m for m in ("sgd", "sam") if m in s.methods and row.seed < s.seeds]:
            model = _final_model(out / "runs" / run_name(ref, row.seed), device)
            try:
                rows.append((ref, *_tempered(model, data, ce)))
            except ValueError as e:
                say(f"[sweep] {label(ref)} tempered to {run_dir.name}'s final CE: none ({e})")
        cols = ["base", "temperature", "checkpoint_ce", *CONTROL_MEASURES]
        _csv(pd.DataFrame(rows, columns=cols), path)
    return {r["base"]: r for r in pd.read_csv(path).to_dict("records")}
