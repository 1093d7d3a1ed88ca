"""Paper-quality (matplotlib) and interactive (plotly) pictures of loss surfaces.

Every writer is atomic (:mod:`analysis.io`) and uses ``matplotlib.figure.Figure``
directly, so no pyplot state or display backend is touched. ``log=True`` shows
:math:`\\log_{10}` of the loss (levels and colour scale in log space).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analysis.io import atomic_write_text, atomic_write_with
from landscape._directions import PCAResult
from landscape._surface import Surface

KINDS = ("contour", "filled", "heatmap", "3d")
_PDF_META = {"Creator": None, "Producer": None, "CreationDate": None}


def save_figure(
    fig: Figure, path: str | os.PathLike, formats=("png", "pdf"), dpi: int = 150
) -> list[Path]:
    """Write ``fig`` as ``path.png`` and ``path.pdf`` (the suffix of ``path`` is replaced),
    atomically and byte-for-byte reproducibly (no dates or versions in the files)."""
    out = []
    for fmt in formats:
        p = Path(path).with_suffix(f".{fmt}")
        meta = _PDF_META if fmt == "pdf" else {"Software": None}
        atomic_write_with(p, lambda f, fmt=fmt, meta=meta: fig.savefig(f, format=fmt, dpi=dpi,
                                                                        metadata=meta))  # fmt: skip
        out.append(p)
    return out


def _values(s: Surface, log: bool) -> np.ndarray:
    z = np.where(s.done, s.loss, np.nan).astype(float)
    z[~np.isfinite(z)] = np.nan
    return np.log10(np.maximum(z, 1e-12)) if log else z


def _levels(zs: Sequence[np.ndarray], n: int) -> np.ndarray:
    finite = np.concatenate([z[np.isfinite(z)] for z in zs])
    if finite.size == 0:
        raise ValueError("the surface has no finite loss values to plot")
    lo, hi = float(finite.min()), float(finite.max())
    return np.linspace(lo, hi if hi > lo else lo + 1.0, n)


def _zlabel(log: bool) -> str:
    return r"$\log_{10}$ loss" if log else "loss"


def plot_1d(
    surfaces: Surface | Sequence[Surface],
    labels: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    log: bool = False,
    accuracy: bool = False,
) -> Figure:
    r"""Loss (and optionally accuracy) along 1D surfaces, overlaid, one line each.

    Where a surface has its standard errors (``loss_se``), the loss line carries a
    shaded band of :math:`\pm 2\,\mathrm{SE}` (about 95%).
    """
    surfaces = [surfaces] if isinstance(surfaces, Surface) else list(surfaces)
    labels = labels or [
        str(s.metadata.get("label", f"surface {i}")) for i, s in enumerate(surfaces)
    ]
    fig = Figure(figsize=(8.5 if accuracy else 4.5, 3.4))
    axes = fig.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
    fig.subplots_adjust(left=0.12 if not accuracy else 0.08, right=0.97, bottom=0.15, top=0.95,
                        wspace=0.25)  # fmt: skip
    for s, lab in zip(surfaces, labels, strict=True):
        if s.dim != 1:
            raise ValueError("plot_1d needs 1D surfaces; use plot_2d for 2D ones")
        loss = np.where(s.done, s.loss, np.nan)
        (line,) = axes[0].plot(s.coords[0], loss, label=lab)
        se = np.where(s.done, s.loss_se, np.nan)
        if np.isfinite(se).any():
            lo = np.maximum(loss - 2 * se, loss * 0.5) if log else loss - 2 * se
            axes[0].fill_between(s.coords[0], lo, loss + 2 * se, color=line.get_color(), alpha=0.2)
        if accuracy:
            axes[1].plot(s.coords[0], np.where(s.done, s.accuracy, np.nan), label=lab)
    axes[0].set_ylabel("loss")
    if log:
        axes[0].set_yscale("log")
    if accuracy:
        axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel(r"$\alpha$")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig


def _draw(ax, s: Surface, z: np.ndarray, kind: str, levels: np.ndarray, cmap: str):
    xs, ys = s.coords
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    if kind == "contour":
        cs = ax.contour(X, Y, z, levels=levels, cmap=cmap, linewidths=0.9)
        ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
    elif kind == "filled":
        cs = ax.contourf(X, Y, z, levels=levels, cmap=cmap)
        ax.contour(X, Y, z, levels=levels, colors="k", linewidths=0.3)
    elif kind == "heatmap":
        cs = ax.pcolormesh(X, Y, z, shading="nearest", cmap=cmap, vmin=levels[0], vmax=levels[-1])
    else:
        cs = ax.plot_surface(X, Y, np.ma.masked_invalid(z), cmap=cmap, vmin=levels[0],
                             vmax=levels[-1], linewidth=0, antialiased=True)  # fmt: skip
        ax.set_zlim(levels[0], levels[-1])
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$\beta$")
    return cs


def plot_2d(
    surfaces: Surface | Sequence[Surface],
    kind: str = "contour",
    labels: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    log: bool = False,
    levels: int = 20,
    cmap: str = "viridis",
) -> Figure:
    """2D surfaces as contour (labelled levels), filled contour, heatmap or 3D surface.

    Several surfaces are drawn side by side with the same levels, colour scale
    and axes, so equal colours mean equal losses across methods.

    Args:
        surfaces: one 2D :class:`Surface` or several.
        kind: ``"contour"``, ``"filled"``, ``"heatmap"`` or ``"3d"``.
        labels: panel titles (default ``metadata["label"]``).
        path: write ``path.png`` and ``path.pdf`` when given.
        log: plot :math:`\\log_{10}` of the loss.
        levels: number of contour levels.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    surfaces = [surfaces] if isinstance(surfaces, Surface) else list(surfaces)
    if not surfaces or any(s.dim != 2 for s in surfaces):
        raise ValueError("plot_2d needs one or more 2D surfaces")
    labels = labels or [str(s.metadata.get("label", "")) for s in surfaces]
    zs = [_values(s, log) for s in surfaces]
    lv = _levels(zs, levels)
    n = len(surfaces)
    # A fixed layout (constrained layout doubles the time of every savefig).
    width = 3.6 * n + 1.2
    fig = Figure(figsize=(width, 3.6))
    kw = {"subplot_kw": {"projection": "3d"}} if kind == "3d" else {"sharex": True, "sharey": True}
    axes = fig.subplots(1, n, squeeze=False, **kw)[0]
    right = 1 - 1.15 / width
    fig.subplots_adjust(left=0.8 / width, right=right, bottom=0.14, top=0.9, wspace=0.25)
    cax = fig.add_axes((right + 0.2 / width, 0.14, 0.12 / width, 0.76))
    for ax, s, z, lab in zip(axes, surfaces, zs, labels, strict=True):
        cs = _draw(ax, s, z, kind, lv, cmap)
        ax.set_title(lab)
        if kind != "3d":
            ax.set_aspect("equal", adjustable="box")
            ax.plot(0, 0, "k+", markersize=7)
    fig.colorbar(cs, cax=cax, label=_zlabel(log))
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_trajectory(
    pca: PCAResult,
    surface: Surface | None = None,
    path: str | os.PathLike | None = None,
    log: bool = False,
    labels: Sequence[str] | None = None,
    levels: int = 20,
) -> Figure:
    """The optimization path projected on its PCA plane, over the loss contours if given.

    Axis labels carry each direction's explained variance (Li et al. 2018, Fig. 9).
    """
    if pca.coords.shape[1] < 2:
        raise ValueError("plot_trajectory needs a 2-component PCA")
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.14, right=0.8, bottom=0.12, top=0.95)
    if surface is not None:
        z = _values(surface, log)
        cs = _draw(ax, surface, z, "contour", _levels([z], levels), "viridis")
        fig.colorbar(cs, cax=fig.add_axes((0.83, 0.12, 0.025, 0.83)), label=_zlabel(log))
    c = pca.coords
    ax.plot(c[:, 0], c[:, 1], "-o", color="C3", markersize=3, linewidth=1.2)
    ax.plot(c[-1, 0], c[-1, 1], "*", color="C3", markersize=12)
    for i, lab in enumerate(labels or []):
        ax.annotate(str(lab), c[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ev = pca.explained_variance_ratio
    ax.set_xlabel(f"1st PCA direction ({100 * ev[0]:.1f}%)")
    ax.set_ylabel(f"2nd PCA direction ({100 * ev[1]:.1f}%)")
    if path is not None:
        save_figure(fig, path)
    return fig


def write_html(
    surfaces: Surface | Sequence[Surface],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    log: bool = False,
) -> Path:
    """A standalone interactive HTML page (plotly.js inline, works offline).

    Each 2D surface gets an interactive 3D surface and a contour map, sharing
    one colour scale across surfaces; 1D surfaces are drawn as lines.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    surfaces = [surfaces] if isinstance(surfaces, Surface) else list(surfaces)
    labels = labels or [
        str(s.metadata.get("label", f"surface {i}")) for i, s in enumerate(surfaces)
    ]
    zs = [_values(s, log) for s in surfaces]
    lv = _levels(zs, 2)
    specs = [[{"type": "surface"}, {"type": "xy"}] if s.dim == 2 else [{"type": "xy"}, None]
             for s in surfaces]  # fmt: skip
    titles = [t for lab in labels for t in (f"{lab}: 3D", f"{lab}: contour")]
    fig = make_subplots(len(surfaces), 2, specs=specs, subplot_titles=titles)
    for r, (s, z, lab) in enumerate(zip(surfaces, zs, labels, strict=True), start=1):
        if s.dim == 1:
            fig.add_trace(go.Scatter(x=s.coords[0], y=z, name=lab), row=r, col=1)
            continue
        scale = {"cmin": lv[0], "cmax": lv[-1], "colorscale": "Viridis"}
        zt = np.where(np.isfinite(z), z, None).T.tolist()  # plotly: z[row=y][col=x]
        xs, ys = s.coords[0].tolist(), s.coords[1].tolist()
        fig.add_trace(go.Surface(x=xs, y=ys, z=zt, name=lab, showscale=r == 1, **scale), r, 1)
        contour = go.Contour(x=xs, y=ys, z=zt, zmin=lv[0], zmax=lv[-1], colorscale="Viridis",
                             showscale=False, contours={"showlabels": True}, name=lab)  # fmt: skip
        fig.add_trace(contour, row=r, col=2)
    fig.update_layout(height=480 * len(surfaces), width=1050, title=_zlabel(log).replace("$", ""))
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    atomic_write_text(path, html)
    return Path(path)
