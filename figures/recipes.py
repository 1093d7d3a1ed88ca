r"""One short, deterministic recipe per paper figure (Du et al., NeurIPS 2022).

Each recipe reads a tidy table (see :mod:`figures._results`) and writes
``<out>/<name>.png`` and ``.pdf`` (plus ``.html`` where interaction helps),
returning the paths written. Same inputs, same bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from figures._results import (
    Grid,
    at_loss,
    band_stats,
    check_curves,
    common_loss_range,
    loss_trajectories,
    matched_loss,
    mean_std,
)
from figures._save import (
    color,
    label,
    method_order,
    plt,
    save_figure,
    save_plotly,
    save_table,
)
from figures._stats import paired_ratio

PathLike = str | os.PathLike


def _band(ax, stats: pd.DataFrame, x: str, method: str, marker: str | None = ".") -> None:
    """One method's centre line and band (``mean``, ``lo``, ``hi`` of :func:`band_stats`);
    markers on the measured points."""
    s = stats[stats["method"] == method].sort_values(x)
    if s.empty:
        return
    n = int(s["n"].max())
    ax.plot(s[x], s["mean"], color=color(method), marker=marker, ms=4,
            label=f"{label(method)} (n={n})")  # fmt: skip
    ax.fill_between(s[x], s["lo"], s["hi"], color=color(method), alpha=0.2, linewidth=0)


def _log_worthy(values) -> bool:
    """Whether a log axis suits ``values``: all positive, spanning more than a factor of 10."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size and (v > 0).all() and v.max() > 10 * v.min())


def _curve_panel(ax, curves: pd.DataFrame, metric: str, ylabel: str, log: bool = False) -> None:
    """Mean +- std per epoch; on a log axis the geometric mean and the min-max over seeds."""
    c = check_curves(curves)
    sub = c[c["metric"] == metric]
    log = log and _log_worthy(sub["value"])
    stats = band_stats(sub, ["method", "epoch"], log=log)
    for m in method_order(stats["method"]):
        _band(ax, stats, "epoch", m)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if not stats.empty:
        title = "geometric mean, min-max" if log else "mean ± 1 sd"
        ax.legend(fontsize=8, title=title, title_fontsize=8)


def _maybe_log(ax, values) -> None:
    """Log y axis when the positive values span more than a factor of 10."""
    if _log_worthy(values):
        ax.set_yscale("log")


def _log_ticks(axis) -> None:
    """Readable ticks on a log axis: 1, 2, 5 x 10^k within about a decade, 1 and 3 x 10^k
    within three, powers of ten beyond."""
    from matplotlib import ticker

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 else 99.0
    subs = (1.0, 2.0, 5.0) if decades < 1.5 else (1.0, 3.0) if decades < 3 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _need(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    curves = check_curves(curves)
    if not (curves["metric"] == metric).any():
        raise ValueError(f"curves table has no rows for metric {metric!r}; run the analysis first")
    return curves


def training_ce(curves: pd.DataFrame, out: PathLike, name: str = "fig4a_train_ce") -> list[Path]:
    """Training cross-entropy per epoch, mean +- std over seeds (the paper's Fig. 4a)."""
    curves = _need(curves, "train_ce")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _curve_panel(ax, curves, "train_ce", "training cross-entropy", log=True)
    ax.set_title("Training CE (Fig. 4a)")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def sam_sharpness(
    curves: pd.DataFrame, out: PathLike, name: str = "fig4b_sam_sharpness"
) -> list[Path]:
    r"""SAM sharpness :math:`L(w+\hat\epsilon)-L(w)`, :math:`\rho=0.05`, per epoch (Fig. 4b).

    :math:`\hat\epsilon = \rho\, g/\|g\|` is SAM's one-step ascent on the training loss.
    """
    curves = _need(curves, "sam_sharpness")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _curve_panel(ax, curves, "sam_sharpness", r"$L(w+\hat\epsilon)-L(w)$, $\rho=0.05$")
    ax.set_title("SAM sharpness per epoch (Fig. 4b)")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def hessian(curves: pd.DataFrame, out: PathLike, name: str = "hessian_per_epoch") -> list[Path]:
    r"""Hessian top eigenvalue :math:`\lambda_{\max}` and trace per epoch, mean +- std."""
    curves = _need(curves, "lambda_max")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    _curve_panel(axes[0], curves, "lambda_max", r"$\lambda_{\max}(H)$", log=True)
    _curve_panel(axes[1], curves, "trace", r"$\mathrm{tr}(H)$", log=True)
    axes[0].set_title(r"Top Hessian eigenvalue")
    axes[1].set_title("Hessian trace (Hutchinson)")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def _shared_levels(surfaces: Mapping[str, Grid], n: int = 21) -> np.ndarray:
    """Contour levels of log10(loss), the same for every panel (one colour scale)."""
    z = np.concatenate([np.log10(np.maximum(np.ravel(g.values), 1e-12)) for g in surfaces.values()])
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    return np.linspace(lo, hi if hi > lo else lo + 1.0, n)


def surfaces_2d(
    surfaces: Mapping[str, Grid], out: PathLike, name: str = "fig2_surfaces_2d"
) -> list[Path]:
    """2D filter-normalized loss surfaces side by side, one shared colour scale (Figs. 2, 5).

    The colour is :math:`\\log_{10}` of the loss on the same levels in every panel, so
    equal colours are equal losses across methods. Also writes an interactive HTML.
    """
    if not surfaces:
        raise ValueError("no surfaces to plot; compute them first (landscape.surface_2d)")
    methods = method_order(surfaces)
    levels = _shared_levels(surfaces)
    fig, axes = plt.subplots(
        1, len(methods), figsize=(2.9 * len(methods) + 1.2, 3.3), squeeze=False,
        sharey=True, layout="constrained",
    )  # fmt: skip
    for ax, m in zip(axes[0], methods, strict=True):
        g = surfaces[m]
        i, j = int(np.argmin(np.abs(g.y))), int(np.argmin(np.abs(g.x)))
        cs = ax.contourf(
            g.x, g.y, np.log10(np.maximum(g.values, 1e-12)), levels=levels, cmap="viridis"
        )
        ax.plot(0, 0, "w+", markersize=8)
        ax.set_title(f"{label(m)}: L(0) = {g.values[i, j]:.3g}", fontsize=10)
        ax.set_xlabel(r"$\alpha$ (direction 1)")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel(r"$\beta$ (direction 2)")
    fig.colorbar(cs, ax=axes[0].tolist(), label=r"$\log_{10}$ training loss", format="%.2f")
    paths = save_figure(fig, Path(out) / name)
    return [*paths, _surfaces_html(surfaces, methods, Path(out) / f"{name}.html")]


def _surfaces_html(surfaces: Mapping[str, Grid], methods: list[str], path: Path) -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    zmin = min(float(np.nanmin(surfaces[m].values)) for m in methods)
    zmax = max(float(np.nanmax(surfaces[m].values)) for m in methods)
    spec = [[{"type": "surface"}] * len(methods)]
    fig = make_subplots(1, len(methods), specs=spec, subplot_titles=[label(m) for m in methods])
    for k, m in enumerate(methods, start=1):
        g = surfaces[m]
        trace = go.Surface(x=g.x, y=g.y, z=g.values, cmin=zmin, cmax=zmax, showscale=k == 1)
        fig.add_trace(trace, row=1, col=k)
        fig.update_scenes(zaxis_range=[zmin, zmax], row=1, col=k)
    fig.update_layout(title="Loss surfaces, shared colour and z scale", height=450)
    return save_plotly(fig, path)


def surface_slices(
    surfaces: Mapping[str, Grid], out: PathLike, name: str = "surface_slices_1d"
) -> list[Path]:
    """The 1D slices through the centre of each 2D surface, overlaid (one panel per direction)."""
    if not surfaces:
        raise ValueError("no surfaces to plot; compute them first (landscape.surface_2d)")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for m in method_order(surfaces):
        g = surfaces[m]
        along_x, along_y = g.center_slices()
        axes[0].plot(g.x, along_x, color=color(m), label=label(m))
        axes[1].plot(g.y, along_y, color=color(m), label=label(m))
    for ax, d in zip(axes, ("direction 1 (β=0)", "direction 2 (α=0)"), strict=True):
        ax.set_xlabel(d)
        ax.grid(alpha=0.3)
    _maybe_log(axes[0], np.concatenate([np.ravel(g.values) for g in surfaces.values()]))
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=8)
    fig.suptitle("1D slices of the 2D surfaces (filter-normalized directions)")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def interpolation(
    interp: pd.DataFrame, out: PathLike, a: str = "sgd", b: str = "saf", name: str | None = None
) -> list[Path]:
    r"""Loss along :math:`\theta(\alpha) = (1-\alpha)\theta_a + \alpha\theta_b` (Goodfellow et al.).

    Args:
        interp: rows ``alpha, split, loss`` (``split`` is ``train`` or ``test``), optionally
            ``accuracy``.
        a, b: the two methods whose final models sit at alpha = 0 and alpha = 1.
    """
    need = {"alpha", "split", "loss"}
    if not need <= set(interp.columns):
        raise ValueError(f"interpolation table needs columns {sorted(need)}")
    has_acc = "accuracy" in interp.columns
    fig, axes = plt.subplots(
        1, 2 if has_acc else 1, figsize=(9 if has_acc else 5, 3.4), squeeze=False
    )
    for split, style in (("train", "-"), ("test", "--")):
        s = interp[interp["split"] == split].sort_values("alpha")
        axes[0][0].plot(s["alpha"], s["loss"], style, color="k", label=split)
        if has_acc:
            axes[0][1].plot(s["alpha"], s["accuracy"], style, color="k", label=split)
    for ax, yl in zip(axes[0], ("loss", "accuracy"), strict=False):
        ax.axvline(0, color=color(a), lw=3, alpha=0.5)
        ax.axvline(1, color=color(b), lw=3, alpha=0.5)
        ax.set_xlabel(rf"$\alpha$: 0 = {label(a)} minimum, 1 = {label(b)} minimum")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _maybe_log(axes[0][0], interp["loss"])
    fig.suptitle(f"Linear interpolation between the {label(a)} and {label(b)} minima (seed 0)")
    fig.tight_layout()
    return save_figure(fig, Path(out) / (name or f"interpolation_{a}_{b}"))


def m_sharpness(msharp: pd.DataFrame, out: PathLike, name: str = "m_sharpness") -> list[Path]:
    r"""m-sharpness (Foret et al. 2021) of the final models against m, mean +- std over seeds.

    :math:`S_m = \frac{1}{|B|/m}\sum_{\text{chunks } c \text{ of size } m}
    [L_c(w+\rho\,g_c/\|g_c\|) - L_c(w)]`.
    """
    need = {"method", "seed", "m", "value"}
    if not need <= set(msharp.columns):
        raise ValueError(f"m-sharpness table needs columns {sorted(need)}")
    stats = band_stats(msharp, ["method", "m"])
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for m in method_order(stats["method"]):
        _band(ax, stats, "m", m, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (examples per perturbation)")
    ax.set_ylabel(r"m-sharpness, $\rho=0.05$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("m-sharpness of the final models")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def table3(
    runs: pd.DataFrame, out: PathLike, name: str = "table3"
) -> tuple[pd.DataFrame, list[Path]]:
    """A table like the paper's Table 3: accuracy mean +- std, images/s, memory.

    No speed ratio: the runs execute one after another, so their throughputs are not a
    side-by-side measurement (``benchmarks/`` measures the ratios).

    Args:
        runs: one row per run with ``method, seed, test_acc`` (fraction or %),
            ``images_per_s`` and ``store_mb`` (extra memory the method keeps; 0 for SGD/SAM).

    Returns:
        The table and the CSV and Markdown paths.
    """
    need = {"method", "seed", "test_acc", "images_per_s", "store_mb"}
    if not need <= set(runs.columns):
        raise ValueError(f"runs table needs columns {sorted(need)}")
    acc = runs["test_acc"] * (100.0 if runs["test_acc"].max() <= 1.0 else 1.0)
    g = runs.assign(test_acc=acc).groupby("method")
    t = pd.DataFrame(
        {
            "seeds": g["seed"].nunique(),
            "test_acc_mean": g["test_acc"].mean(),
            "test_acc_std": g["test_acc"].std(ddof=1).fillna(0.0),
            "images_per_s": g["images_per_s"].mean(),
            "store_mb": g["store_mb"].max(),
        }
    )
    t = t.loc[method_order(t.index)]
    t.insert(0, "method", [label(m) for m in t.index])
    t = t.round({"images_per_s": 0})
    t["test_acc (%)"] = [
        f"{a:.2f} ± {s:.2f}" for a, s in zip(t.test_acc_mean, t.test_acc_std, strict=True)
    ]
    t = t.reset_index(drop=True)
    return t, save_table(t, Path(out) / name)


SWEEP_METRICS = (("sam_sharpness", r"SAM sharpness, $\rho=0.05$"),
                 ("lambda_max", r"$\lambda_{\max}(H)$"), ("test_acc", "test accuracy"))  # fmt: skip


def sweep(
    table: pd.DataFrame, curves: pd.DataFrame, out: PathLike, name: str = "saf_sweep"
) -> list[Path]:
    r"""Final SAM sharpness, :math:`\lambda_{\max}` and test accuracy of SAF against
    :math:`\lambda`, one line per lag, with SGD's and SAM's final values (mean +- std
    over seeds) as horizontal bands.

    A second row, when ``table`` has ``sgd_<measure>_same_ce`` columns, divides each SAF
    run's final measure by SGD's where SGD's training CE equalled that run's final CE
    (1 = as sharp as SGD at the same loss), and shows SAM's ratio at those losses: a
    stronger SAF that stops at a higher loss is not credited for stopping there. With
    ``sgd_tempered_<measure>`` columns it also shows SAF over the same seed's final SGD
    model tempered to that run's final CE.

    Args:
        table: rows ``lam, lag, seed, sam_sharpness, lambda_max, test_acc`` (optionally
            ``sgd_<measure>_same_ce`` and ``sam_<measure>_same_ce``).
        curves: the study's curves (for the SGD and SAM reference bands).
    """
    c = check_curves(curves)
    last = c[c.groupby(["method", "seed", "metric"])["epoch"].transform("max") == c["epoch"]]
    matched = [(k, yl) for k, yl in SWEEP_METRICS if f"sgd_{k}_same_ce" in table]
    rows = 2 if matched else 1
    fig, axes = plt.subplots(rows, 3, figsize=(12, 3.4 * rows), squeeze=False)
    for ax, (k, yl) in zip(axes[0], SWEEP_METRICS, strict=True):
        _sweep_panel(ax, table, k, yl, mean_std(last[last.metric == k], ["method"]))
    for ax, (k, yl) in zip(axes[1] if matched else [], matched, strict=False):
        t = table.assign(ratio=table[k] / table[f"sgd_{k}_same_ce"])
        _sweep_panel(ax, t, "ratio", f"{yl} / SGD's at the same CE", pd.DataFrame())
        ax.axhline(1.0, color=color("sgd"), ls="--", label="SGD at the same training CE")
        if f"sam_{k}_same_ce" in table:
            sam = table.assign(value=table[f"sam_{k}_same_ce"] / table[f"sgd_{k}_same_ce"])
            for i, (lag, g) in enumerate(mean_std(sam, ["lag", "lam"]).groupby("lag")):
                ax.plot(g["lam"], g["mean"], color=color("sam"), ls=(":", "-.")[i % 2],
                        marker="x+"[i % 2], label=f"SAM at those CEs (lag {lag} runs)")  # fmt: skip
        if f"sgd_tempered_{k}" in table:  # SAF over the same seed's SGD tempered to its CE
            tempered = table.assign(value=table[k] / table[f"sgd_tempered_{k}"])
            for i, (lag, g) in enumerate(mean_std(tempered, ["lag", "lam"]).groupby("lag")):
                ax.plot(g["lam"], g["mean"], color="0.4", ls=(":", "-.")[i % 2],
                        marker="dv"[i % 2], label=f"SAF / tempered SGD (lag {lag})")  # fmt: skip
        ax.set_title("each SAF run at its final training CE", fontsize=10)
    for ax in axes[1][len(matched) :] if matched else []:
        ax.axis("off")
    for row in axes:
        row[0].legend(fontsize=8)
    fig.suptitle(r"SAF's sharpness against $\lambda$ and the lag $\tilde E$")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def _sweep_panel(ax, table, k: str, ylabel: str, ref: pd.DataFrame) -> None:
    ref = ref.set_index("method") if len(ref) else ref
    for m in [m for m in ("sgd", "sam") if m in ref.index]:
        mu, sd = ref.loc[m, "mean"], ref.loc[m, "std"]
        ax.axhspan(mu - sd, mu + sd, color=color(m), alpha=0.15, lw=0)
        ax.axhline(mu, color=color(m), ls="--", label=f"{label(m)} (final)")
    stats = mean_std(table.rename(columns={k: "value"}), ["lag", "lam"])
    n_lags = stats["lag"].nunique()
    for i, (lag, g) in enumerate(stats.groupby("lag")):  # lags apart: marker, dash, x offset
        shade = plt.get_cmap("Reds")(0.5 + 0.45 * i / max(1, n_lags - 1))
        shift = 1.06 ** (i - (n_lags - 1) / 2)
        style = dict(marker="os^Dv"[i % 5], ls=("-", "--", "-.", ":")[i % 4], capsize=3)
        ax.errorbar(g["lam"] * shift, g["mean"], g["std"], color=shade, **style,
                    label=f"SAF, lag {lag}")  # fmt: skip
    ax.set_xscale("log")
    lams = sorted(set(table["lam"]))
    ax.set_xticks(lams, [f"{v:g}" for v in lams])  # the swept values, no crowded minor labels
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(r"$\lambda$ (trajectory-loss weight)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


# -- sharpness against the training loss ---------------------------------------------------

LOSS_METRICS = (
    ("lambda_max", r"$\lambda_{\max}(H)$"),
    ("trace", r"$\mathrm{tr}(H)$"),
    ("sam_sharpness", r"SAM sharpness, $\rho=0.05$"),
    ("adaptive_sharpness", r"adaptive sharpness, $\rho=0.5$"),
)


def sharpness_vs_loss(
    curves: pd.DataFrame,
    out: PathLike,
    name: str = "sharpness_vs_loss",
    loss: str = "checkpoint_ce",
    level: float | None = None,
) -> list[Path]:
    r"""Each sharpness measure against the training cross-entropy along every trajectory.

    The cross-entropy Hessian shrinks as the softmax saturates (for a confident sample
    :math:`\nabla^2_z \ell = \mathrm{diag}(p) - pp^\top \to 0`), so a run that stops at
    a higher training loss looks sharper. Plotting against the loss compares methods where
    they had the same loss. One panel per measure present (:math:`\lambda_{\max}`, trace,
    SAM and adaptive sharpness); thin lines are the seeds' analysed checkpoints, the thick
    line the geometric mean over seeds at common loss levels (interpolated in log-log,
    :func:`figures._results.at_loss`) with the min-max band, on log axes; the dotted line
    is the lowest loss every run reaches (the matched level of the tables).

    Args:
        curves: tidy curves with ``loss`` (the checkpoint's training cross-entropy) and
            the measures at the same epochs.
        level: the dotted matched level (None: the lowest loss every run reaches).
    """
    c = check_curves(curves)
    if not (c["metric"] == loss).any():
        raise ValueError(f"curves table has no rows for metric {loss!r}; run the analysis first")
    panels = [(k, yl) for k, yl in LOSS_METRICS if (c["metric"] == k).any()]
    if not panels:
        raise ValueError(f"curves table has none of {[k for k, _ in LOSS_METRICS]}")
    common = common_loss_range(c, [k for k, _ in panels], loss)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.5), squeeze=False)
    for ax, (k, yl) in zip(axes[0], panels, strict=True):
        runs = loss_trajectories(c, k, loss)
        values = np.concatenate([y for _, y in runs.values()]) if runs else np.array([])
        log_y = _log_worthy(values)
        for m in method_order({run[0] for run in runs}):
            seeds = [xy for run, xy in runs.items() if run[0] == m]
            for x, y in seeds:
                ax.plot(x, y, color=color(m), lw=0.7, alpha=0.35, marker=".", ms=3)
            lo, hi = max(x.min() for x, _ in seeds), min(x.max() for x, _ in seeds)
            if lo >= hi:
                continue
            grid = np.geomspace(lo, hi, 30)
            v = np.array([[at_loss(x, y, g) for g in grid] for x, y in seeds])
            centre = np.exp(np.log(v).mean(0)) if (v > 0).all() else v.mean(0)
            ax.plot(grid, centre, color=color(m), lw=2, label=f"{label(m)} (n={len(seeds)})")
            ax.fill_between(grid, v.min(0), v.max(0), color=color(m), alpha=0.2, lw=0)
        if level is not None or common is not None:
            ax.axvline(common[0] if level is None else level, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis) if log_y else (ax.xaxis,):
            _log_ticks(axis)
        ax.invert_xaxis()  # training runs from left to right
        ax.set_xlabel("training cross-entropy (checkpoint)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Sharpness against the training loss (training runs left to right)")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


# -- the verdict ---------------------------------------------------------------------------

VERDICT_MEASURES = {
    "lambda_max": r"$\lambda_{\max}(H)$",
    "sam_sharpness": r"SAM sharpness, $\rho=0.05$",
}


def verdict(table: pd.DataFrame, out: PathLike, name: str = "verdict") -> list[Path]:
    r"""Each method's measure over each reference: the geometric mean of the per-seed ratios
    and its 95% t interval on a log axis, one panel per measure (:func:`figures.verdict_table`).

    A filled marker is significant after Holm's correction over the whole table, an open one
    is not; the dotted line is 1 (as flat as the reference). Left of it: flatter.

    Args:
        table: rows ``method, measure, reference, ratio, lo, hi, significant``.
    """
    need = {"method", "measure", "reference", "ratio", "lo", "hi", "significant"}
    if not need <= set(table.columns):
        raise ValueError(f"verdict table needs columns {sorted(need)}")
    measures = [k for k in VERDICT_MEASURES if (table["measure"] == k).any()]
    if not measures:
        raise ValueError(f"verdict table has none of the measures {list(VERDICT_MEASURES)}")
    refs = list(dict.fromkeys(table["reference"]))
    rows = [(m, r) for m in method_order(table["method"]) for r in refs
            if ((table.method == m) & (table.reference == r)).any()]  # fmt: skip
    size = (5.2 * len(measures), 0.32 * len(rows) + 1.4)
    fig, axes = plt.subplots(1, len(measures), figsize=size, sharey=True, squeeze=False)
    for ax, k in zip(axes[0], measures, strict=True):
        t = table[table.measure == k].set_index(["method", "reference"])
        for i, key in enumerate(rows):
            if key not in t.index:
                continue
            r = t.loc[key]
            lo, hi = r["lo"], r["hi"]
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [i, i], color=color(key[0]), lw=1.5)
            ax.plot(r["ratio"], i, "o", color=color(key[0]), ms=6,
                    mfc=color(key[0]) if r["significant"] else "white")  # fmt: skip
        ax.axvline(1.0, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        _log_ticks(ax.xaxis)
        ax.set_xlabel(f"{VERDICT_MEASURES[k]}: method / reference")
        ax.grid(alpha=0.3, axis="x", which="both", lw=0.4)
    axes[0][0].set_yticks(range(len(rows)), [f"{label(m)} vs {r}" for m, r in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle("Ratio over seeds, 95% CI; filled: significant after Holm", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def matched_sensitivity(
    curves: pd.DataFrame, out: PathLike, levels, name: str = "matched_sensitivity"
) -> list[Path]:
    r"""Each method over SGD at several matched training losses, and the learning rate there.

    Per level and seed, a measure where each run's training CE was that level
    (:func:`figures._results.matched_loss`); the dots are the geometric mean over seeds of the
    per-seed ratio to SGD, the bars its 95% t interval (:func:`figures._stats.paired_ratio`).
    The last panel is the learning rate each method had at that loss (interpolated like the
    measures; geometric mean over seeds, min-max bar): methods meet a level at different
    points of the schedule, so a matched comparison also compares learning rates.
    """
    c = check_curves(curves)
    measures = [(k, yl) for k, yl in VERDICT_MEASURES.items() if (c["metric"] == k).any()]
    if not levels or not measures:
        raise ValueError("no matched levels or measures; the runs share no training loss")
    fig, axes = plt.subplots(1, len(measures) + 1, figsize=(4.2 * (len(measures) + 1), 3.5))
    for ax, (k, yl) in zip(axes, measures, strict=False):
        at = matched_loss(c, [k], list(levels))
        for i, m in enumerate(x for x in method_order(at["method"]) if x != "sgd"):
            r = [_level_ratio(at, m, lv) for lv in levels]
            x = np.asarray(levels) * 1.04 ** (i - 1)  # methods apart
            mid = np.array([q.ratio for q in r])
            err = np.nan_to_num(np.abs(np.array([[q.lo, q.hi] for q in r]).T - mid))
            ax.errorbar(x, mid, yerr=err, color=color(m), marker="o", capsize=3, label=label(m))
        ax.axhline(1.0, color=color("sgd"), ls=":", lw=1)
        ax.set_ylabel(f"{yl} / SGD's at that CE")
    lr = matched_loss(c, ["lr"], list(levels))
    for m, g in lr.groupby("method"):
        st = band_stats(g, ["level"], log=True)
        err = np.clip([st["mean"] - st["lo"], st["hi"] - st["mean"]], 0, None)  # rounding
        axes[-1].errorbar(st["level"], st["mean"], err, color=color(m), marker="o", capsize=3,
                          label=label(m))  # fmt: skip
    axes[-1].set_yscale("log")
    axes[-1].set_ylabel("learning rate at that CE")
    for ax in axes:
        ax.set_xscale("log")
        _log_ticks(ax.xaxis)
        ax.invert_xaxis()
        ax.set_xlabel("matched training cross-entropy")
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=8)
    fig.suptitle("Matched-loss comparison at several levels (95% CI over seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def _level_ratio(at: pd.DataFrame, method: str, level: float):
    """The paired ratio method / SGD at one level (the seeds that both reach it)."""
    one = at[at["level"] == level].set_index(["method", "seed"])["value"]
    a = one.xs(method) if method in one.index else one.iloc[:0]
    b = one.xs("sgd") if "sgd" in one.index else one.iloc[:0]
    common = sorted(set(a.index) & set(b.index))
    return paired_ratio(a.loc[common].to_numpy(), b.loc[common].to_numpy())


def flatness_vs_gap(
    points: pd.DataFrame, table: pd.DataFrame, out: PathLike, name: str = "flatness_vs_gap"
) -> list[Path]:
    """Each final flatness measure against the generalization gap, one point per run
    (colour: method), titled with Spearman's rho [95% CI] over the methods' runs, pooled and
    within seeds (:func:`figures._gap.gap_correlations`).

    Args:
        points: :func:`figures._gap.gap_points` (``method, seed, <measure>..., gap``).
        table: :func:`figures._gap.gap_correlations`'s rows.
    """
    measures = list(dict.fromkeys(table["measure"]))
    fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 3.4), squeeze=False)
    rho = table.drop_duplicates("measure").set_index("measure")  # the first set: the methods
    within = table[table["runs"].str.contains("within")].set_index("measure")
    for ax, k in zip(axes[0], measures, strict=True):
        for m in method_order(points["method"]):
            p = points[points["method"] == m]
            face = "none" if m == "sgd_ls" else color(m)  # hollow: not in the titled rho
            ax.scatter(p[k], p["gap"], edgecolors=color(m), facecolors=face, s=18, label=label(m))
        if _log_worthy(points[k]):
            ax.set_xscale("log")
        title = f"Spearman, pooled {_rho_ci(rho.loc[k])}"
        title += f"\nwithin seeds {_rho_ci(within.loc[k])}" if k in within.index else ""
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"final {k}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test CE - training CE")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Flatness against the generalization gap (final models, every seed)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)


def _rho_ci(r) -> str:
    return f"{r.spearman:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}]"
