"""Deterministic, atomic figure and table writers shared by every recipe."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # leave an interactive session's backend alone
    matplotlib.use("Agg")  # no display needed; figures are files
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import landscape  # noqa: E402
from analysis.io import atomic_write_text  # noqa: E402

METHODS = ("sgd", "sam", "asam", "saf", "mesa", "sgd_ls")
LABELS = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "saf": "SAF", "mesa": "MESA",
          "sgd_ls": "SGD+LS"}  # fmt: skip
COLORS = {
    "sgd": "#4d4d4d",
    "sam": "#1f77b4",
    "asam": "#17becf",
    "saf": "#d62728",
    "mesa": "#2ca02c",
    "sgd_ls": "#ff7f0e",
}
PLOTLY_JS = "plotly.min.js"


def label(method: str) -> str:
    """Display name of a method (``"saf"`` -> ``"SAF"``)."""
    return LABELS.get(method, method)


def color(method: str) -> str:
    """A fixed colour per method so every figure agrees."""
    return COLORS.get(method, "#9467bd")


def method_order(methods) -> list[str]:
    """The methods present, in the paper's order (SGD, SAM, ASAM, SAF, MESA), then the
    label-smoothing control and others."""
    present = list(dict.fromkeys(methods))
    known = [m for m in METHODS if m in present]
    return known + sorted(m for m in present if m not in METHODS)


def save_figure(fig, stem: str | os.PathLike, dpi: int = 110) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` (:func:`landscape.save_figure`), then
    close it."""
    paths = landscape.save_figure(fig, stem, dpi=dpi)
    plt.close(fig)
    return paths


def save_plotly(fig, path: str | os.PathLike) -> Path:
    """Write a plotly figure as HTML next to a shared local ``plotly.min.js`` (works offline)."""
    path = Path(path)
    js = path.parent / PLOTLY_JS
    if not js.is_file():
        from plotly.offline import get_plotlyjs

        atomic_write_text(js, get_plotlyjs())
    html = fig.to_html(include_plotlyjs="directory", full_html=True, div_id=path.stem)
    atomic_write_text(path, html)
    return path


def save_table(df: pd.DataFrame, stem: str | os.PathLike, floatfmt: str = ".4g") -> list[Path]:
    """Write ``df`` as ``stem.csv`` and ``stem.md`` (a GitHub Markdown table) atomically."""
    stem = Path(stem)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
    atomic_write_text(paths[0], df.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(paths[1], markdown_table(df, floatfmt))
    return paths


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table of ``df`` (no extra dependency such as tabulate)."""

    def cell(v) -> str:
        if isinstance(v, float):
            if v != v:
                return ""
            return f"{v:.0f}" if v == round(v) and abs(v) < 1e15 else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"
