r"""Sharpness at step resolution during training, beside each optimizer's stability threshold.

Each main run is replayed with :class:`analysis.SharpnessMonitor` (``saf train
--track-sharpness``): the same config, seed and data order, with the top Hessian eigenvalue
:math:`\lambda_{\max}` measured on the first ``probe_samples`` training samples (eval-mode
BatchNorm) every :math:`\lceil S / n \rceil` steps (:math:`S` steps per epoch, :math:`n` =
``Settings.track_per_epoch``). The monitor leaves the run bitwise as it is, so the replay's
final weights must equal the stored run's: each replay checks it (column ``replay_equal``),
which also shows that the runs reproduce. Replaying rather than tracking in the first training
keeps older results folders valid and costs one more (cheap) training run per seed.

Beside :math:`\lambda_{\max}` the rows hold the optimizer's threshold (heavy-ball SGD:
:math:`2(1+\beta)/\eta`; Cohen et al., ICLR 2021) and, for SAM, its own edge (Long &
Bartlett, ICLR 2023; :func:`analysis.stability.sam_edge`), both at the step's learning rate.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis import load_state_dict
from analysis.io import atomic_write_text
from figures._save import color, label, method_order, plt, save_figure
from figures._settings import Settings, say
from figures._stats import paired_ratio
from saf import list_checkpoints, load_dataset, steps_per_epoch, train

COLUMNS = ["method", "seed", "step", "epoch", "lr", "loss", "lambda_1", "threshold",
           "sam_edge", "matvecs", "seconds", "replay_equal"]  # fmt: skip


def track_every(s: Settings) -> int:
    """Steps between two measurements: ``ceil(steps per epoch / track_per_epoch)``."""
    n = len(load_dataset(s.data, "train", s.data_dir))
    return math.ceil(steps_per_epoch(n, s.batch_size) / s.track_per_epoch)


def track_all(s: Settings, out: Path, runs: dict, config, progress: bool) -> pd.DataFrame:
    """Per-step rows of every main run (cached per run in ``out/tracking/<run>.csv``).

    Args:
        runs: ``{(method, seed): run_dir}`` of the main runs.
        config: ``config(method, seed, run_dir, **over) -> TrainConfig``, the run's own
            config (:func:`figures._stages.train_config` with the device and progress bound).
    """
    if not s.track_per_epoch:
        return pd.DataFrame(columns=COLUMNS)
    every, parts = track_every(s), []
    for i, ((method, seed), run_dir) in enumerate(sorted(runs.items()), 1):
        path = out / "tracking" / f"{run_dir.name}.csv"
        if not path.is_file():
            say(f"[track {i}/{len(runs)}] {run_dir.name}: replay, lambda_max every {every} steps")
            _replay(run_dir, path, config(method, seed, path.with_suffix(".replay"),
                                          track_sharpness=every, save_every=s.epochs))  # fmt: skip
        parts.append(pd.read_csv(path).assign(method=method, seed=seed))
    df = pd.concat(parts, ignore_index=True)
    return df[[c for c in COLUMNS if c in df.columns]]


def _replay(run_dir: Path, path: Path, cfg) -> None:
    """Train ``cfg`` afresh with the monitor, check its final weights, keep only the rows."""
    tmp = Path(cfg.out)
    shutil.rmtree(tmp, ignore_errors=True)  # a replay cut short starts over
    train(cfg)
    equal = same_weights(list_checkpoints(tmp)[-1][1], list_checkpoints(run_dir)[-1][1])
    if not equal:
        say(f"{run_dir.name}: the replay's final weights differ from the run's (not bitwise)")
    rows = pd.read_csv(tmp / "sharpness.csv").assign(replay_equal=equal)
    atomic_write_text(path, rows.to_csv(index=False, lineterminator="\n"))
    shutil.rmtree(tmp)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold bitwise equal tensors under the same names."""
    x, y = load_state_dict(a), load_state_dict(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def sharpness_per_step(track: pd.DataFrame, out, epochs_from: dict | None = None,
                       name: str = "sharpness_per_step") -> list[Path]:  # fmt: skip
    r"""One panel per method: :math:`\lambda_{\max}` per step (thin: each seed; thick: the
    geometric mean over seeds) against the optimizer's threshold :math:`2(1+\beta)/\eta`
    (dashed) and, for SAM, its own edge (dotted, the median over seeds); shared log y axis.

    Args:
        epochs_from: ``{method: first step of the trajectory loss}`` drawn as a vertical line.
    """
    methods = method_order(track["method"])
    fig, axes = plt.subplots(1, len(methods), figsize=(3.3 * len(methods), 3.4), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, m in zip(axes[0], methods, strict=True):
        _panel(ax, track[track["method"] == m], m, (epochs_from or {}).get(m))
    axes[0][0].set_ylabel(r"Hessian $\lambda_{\max}$ (probe set)")
    positive = track["lambda_1"][track["lambda_1"] > 0]
    if len(positive):  # room for the lowest threshold, which grows without bound as eta -> 0
        top = max(positive.max() * 3, track["threshold"].min() * 2)
        axes[0][0].set_ylim(positive.min() / 1.5, top)
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def _panel(ax, rows: pd.DataFrame, method: str, start: int | None) -> None:
    for _, r in rows.groupby("seed"):
        ax.plot(r["step"], r["lambda_1"], color=color(method), lw=0.6, alpha=0.35)
    g = rows.groupby("step")
    mean = np.exp(g["lambda_1"].apply(lambda v: np.log(v.clip(lower=1e-30)).mean()))
    n = rows["seed"].nunique()
    ax.plot(mean.index, mean.values, color=color(method), lw=1.6, label=f"{label(method)} (n={n})")
    first = rows[rows["seed"] == rows["seed"].min()].sort_values("step")
    limit = first["threshold"].where(np.isfinite(first["threshold"]))
    ax.plot(first["step"], limit, "k--", lw=1, label=r"$2(1+\beta)/\eta$")
    if method == "sam" and rows["sam_edge"].notna().any():
        edge = g["sam_edge"].median()
        ax.plot(edge.index, edge.values, "k:", lw=1.2, label="SAM edge (median)")
    if start is not None:
        ax.axvline(start, color="0.6", lw=0.8, ls="-.", label="trajectory loss on")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(label(method))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def tracking_findings(track: pd.DataFrame) -> list[str]:
    """Report lines: per method, the peak of :math:`\\lambda_{\\max}/\\text{threshold}` and the
    share of measurements within 10% of the threshold or above it (geometric mean, min-max
    over seeds); a line for any replay that was not bitwise the run."""
    if track.empty:
        return []
    t = track.assign(ratio=track["lambda_1"] / track["threshold"])
    parts, near = [], []
    for m in method_order(t["method"]):
        per_seed = t[t["method"] == m].groupby("seed")
        peak = per_seed["ratio"].max()
        share = per_seed["ratio"].apply(lambda v: float((v >= 0.9).mean()))
        parts.append(f"{label(m)} {_gmean(peak):.2g} ({peak.min():.2g}-{peak.max():.2g})")
        near.append(f"{label(m)} {100 * share.mean():.0f}%")
    every = int(np.diff(np.sort(t["step"].unique()))[:1].min()) if t["step"].nunique() > 1 else 1
    lines = [
        f"Per-step sharpness (lambda_max on the probe set every {every} steps): peak "
        f"lambda_max / 2(1+beta)/eta, geometric mean over seeds (min-max): {'; '.join(parts)}",
        "Measurements with lambda_max at >= 90% of 2(1+beta)/eta (mean over seeds): "
        + "; ".join(near),
    ]
    lines += _paired_lines(t)
    if "replay_equal" in t and not t["replay_equal"].all():
        bad = sorted({f"{m}-s{k}" for m, k in t[~t["replay_equal"]][["method", "seed"]].values})
        lines.append(f"Replays not bitwise equal to their runs: {', '.join(bad)}")
    return lines


def _paired_lines(t: pd.DataFrame) -> list[str]:
    """Each method's peak and trajectory-mean lambda_max over SGD's, seed by seed (the
    geometric mean of the per-seed ratios, 95% t interval; :func:`figures._stats.paired_ratio`)."""
    if "sgd" not in set(t["method"]):
        return []
    out = []
    for name, stat in (("peak", "max"), ("mean over the measured steps", "mean")):
        per = t.groupby(["method", "seed"])["lambda_1"].agg(stat).unstack("method")
        cells = []
        for m in method_order(per.columns):
            if m != "sgd":
                r = paired_ratio(per[m], per["sgd"])
                cells.append(f"{label(m)} {r.ratio:.2f} [{r.lo:.2f}, {r.hi:.2f}]")
        out.append(f"Per-step lambda_max, {name}, over SGD's (paired seeds, 95% CI; at each "
                   f"method's own training CE, not matched): " + "; ".join(cells))  # fmt: skip
    return out


def _gmean(v: pd.Series) -> float:
    return float(np.exp(np.log(v.clip(lower=1e-30)).mean()))
