r"""One short, deterministic recipe per paper figure (Du et al., NeurIPS 2022).

Each recipe reads a tidy table (see :mod:`figures._results`) and writes
``<out>/<name>.png`` and ``.pdf`` (plus ``.html`` where interaction helps),
returning the paths written. Same inputs, same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from figures._results import Grid, check_curves, mean_std, metric_curves
from figures._save import (
    color,
    label,
    method_order,
    plt,
    save_figure,
    save_plotly,
    save_table,
)

PathLike = str | os.PathLike


def _band(ax, stats: pd.DataFrame, x: str, method: str, marker: str | None = None) -> None:
    """One method's mean line and a +-1 std band."""
    s = stats[stats["method"] == method].sort_values(x)
    if s.empty:
        return
    n = int(s["n"].max())
    ax.plot(s[x], s["mean"], color=color(method), marker=marker, label=f"{label(method)} (n={n})")
    lo, hi = s["mean"] - s["std"], s["mean"] + s["std"]
    ax.fill_between(s[x], lo, hi, color=color(method), alpha=0.2, linewidth=0)


def _curve_panel(ax, curves: pd.DataFrame, metric: str, ylabel: str, log: bool = False) -> None:
    stats = metric_curves(curves, metric)
    for m in method_order(stats["method"]):
        _band(ax, stats, "epoch", m)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log:
        _maybe_log(ax, stats["mean"])
    ax.grid(alpha=0.3)
    if not stats.empty:
        ax.legend(fontsize=8)


def _maybe_log(ax, values) -> None:
    """Log y axis when the positive values span more than a factor of 10."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and (v > 0).all() and v.max() > 10 * v.min():
        ax.set_yscale("log")


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
    stats = mean_std(msharp, ["method", "m"])
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
    """A table like the paper's Table 3: accuracy mean +- std, images/s, ratio to SGD, memory.

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
    base = t["images_per_s"].get("sgd", np.nan)
    t["speed_vs_sgd"] = t["images_per_s"] / base
    t.insert(0, "method", [label(m) for m in t.index])
    t = t.round({"images_per_s": 0})
    t["test_acc (%)"] = [
        f"{a:.2f} ± {s:.2f}" for a, s in zip(t.test_acc_mean, t.test_acc_std, strict=True)
    ]
    t = t.reset_index(drop=True)
    return t, save_table(t, Path(out) / name)


def sweep(
    table: pd.DataFrame, curves: pd.DataFrame, out: PathLike, name: str = "saf_sweep"
) -> list[Path]:
    r"""Final SAM sharpness, :math:`\lambda_{\max}` and test accuracy of SAF against
    :math:`\lambda`, one line per lag, with SGD's and SAM's final values (mean +- std
    over seeds) as horizontal bands.

    Args:
        table: rows ``lam, lag, seed, sam_sharpness, lambda_max, test_acc``.
        curves: the study's curves (for the SGD and SAM reference bands).
    """
    metrics = [("sam_sharpness", r"SAM sharpness, $\rho=0.05$"),
               ("lambda_max", r"$\lambda_{\max}(H)$"), ("test_acc", "test accuracy")]  # fmt: skip
    c = check_curves(curves)
    last = c[c.groupby(["method", "seed", "metric"])["epoch"].transform("max") == c["epoch"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (k, yl) in zip(axes, metrics, strict=True):
        ref = mean_std(last[last.metric == k], ["method"]).set_index("method")
        for m in [m for m in ("sgd", "sam") if m in ref.index]:
            mu, sd = ref.loc[m, "mean"], ref.loc[m, "std"]
            ax.axhspan(mu - sd, mu + sd, color=color(m), alpha=0.15, lw=0)
            ax.axhline(mu, color=color(m), ls="--", label=f"{label(m)} (final)")
        stats = mean_std(table.rename(columns={k: "value"}), ["lag", "lam"])
        n_lags = stats["lag"].nunique()
        for i, (lag, g) in enumerate(stats.groupby("lag")):
            shade = plt.get_cmap("Reds")(0.5 + 0.45 * i / max(1, n_lags - 1))
            ax.errorbar(g["lam"], g["mean"], g["std"], color=shade, marker="o", capsize=3,
                        label=f"SAF, lag {lag}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(r"$\lambda$ (trajectory-loss weight)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(r"SAF's final sharpness against $\lambda$ and the lag $\tilde E$")
    fig.tight_layout()
    return save_figure(fig, Path(out) / name)
