"""The single-page report (``index.html``): every figure, every table, the settings.

The page is static and works offline. A small inline script counts the images
that loaded and writes the counts on ``<body>`` (``data-images-ok``,
``data-images-broken``) so a headless browser can check that it renders.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.io import atomic_write_text
from figures._results import check_curves, epoch_at_loss, matched_loss, mean_std
from figures._save import label, method_order, save_table
from figures._stats import paired_ratio

FINAL_METRICS = ("test_acc", "train_ce", "checkpoint_ce", "sam_sharpness", "adaptive_sharpness",
                 "lambda_max", "trace")  # fmt: skip
MEASURES = (
    ("sam_sharpness", "one-step SAM sharpness (rho=0.05)"),
    ("adaptive_sharpness", "adaptive SAM sharpness (rho=0.5)"),
    ("lambda_max", "Hessian lambda_max"),
    ("trace", "Hessian trace"),
)


@dataclass
class Section:
    """One figure of the report: its PNG, the other formats, and a caption."""

    title: str
    png: Path
    caption: str = ""
    links: list[Path] = field(default_factory=list)


def final_metrics(curves: pd.DataFrame, metrics: Sequence[str] = FINAL_METRICS) -> pd.DataFrame:
    """Mean and std over seeds of each metric at each run's last epoch, one row per method."""
    c = check_curves(curves)
    c = c[c["metric"].isin(metrics)].dropna(subset=["value"])
    last = c.groupby(["method", "seed", "metric"])["epoch"].transform("max")
    stats = mean_std(c[c["epoch"] == last], ["method", "metric"])
    wide = stats.pivot(index="method", columns="metric", values=["mean", "std"])
    rows = []
    for m in method_order(wide.index):
        row = {"method": label(m), "seeds": int(stats[stats.method == m]["n"].max())}
        for k in metrics:
            if ("mean", k) in wide.columns:
                row[f"{k}_mean"] = wide.loc[m, ("mean", k)]
                row[f"{k}_std"] = wide.loc[m, ("std", k)]
        rows.append(row)
    return pd.DataFrame(rows)


def findings(final: pd.DataFrame) -> list[str]:
    """Plain sentences comparing SAF (and SAM, MESA) with SGD at the last epoch, in numbers."""
    f = final.set_index("method")
    if "SGD" not in f.index:
        return []
    out = []
    for k, what in (
        ("checkpoint_ce", "training cross-entropy (eval mode, analysed samples)"),
        *MEASURES,
        ("test_acc", "test accuracy"),
    ):
        if f"{k}_mean" not in f.columns:
            continue
        base = f.loc["SGD", f"{k}_mean"]
        parts = [
            f"{m} {f.loc[m, f'{k}_mean']:.3g} ± {f.loc[m, f'{k}_std']:.2g}"
            + (f" ({f.loc[m, f'{k}_mean'] / base:.2f}× SGD)" if k != "test_acc" and base else "")
            for m in f.index
            if m != "SGD"
        ]
        out.append(
            f"Final {what}: SGD {base:.3g} ± {f.loc['SGD', f'{k}_std']:.2g}; " + "; ".join(parts)
        )
    return out


def display_table(final: pd.DataFrame) -> pd.DataFrame:
    """``final_metrics`` with each ``<k>_mean``/``<k>_std`` pair as one "mean ± std" column."""
    out = final[[c for c in final.columns if not c.endswith(("_mean", "_std"))]].copy()
    for c in final.columns:
        if c.endswith("_mean") and c[:-5] + "_std" in final.columns:
            k = c[:-5]
            out[k] = [
                f"{m:.3g} ± {s:.2g}" for m, s in zip(final[c], final[k + "_std"], strict=True)
            ]
    return out


def epoch_average_findings(curves: pd.DataFrame) -> list[str]:
    """SAM sharpness and lambda_max averaged over each run's epochs, then over seeds, vs SGD.

    The area under the curves of Fig. 4b: it captures an effect during training that the
    last epoch alone can miss.
    """
    c = check_curves(curves)
    out = []
    for k, what in (("sam_sharpness", "SAM sharpness"), ("lambda_max", "lambda_max")):
        per_run = c[c.metric == k].groupby(["method", "seed"], as_index=False)["value"].mean()
        st = mean_std(per_run, ["method"]).set_index("method")
        if "sgd" not in st.index:
            continue
        base = st.loc["sgd", "mean"]
        parts = [
            f"{label(m)} {st.loc[m, 'mean']:.3g} ± {st.loc[m, 'std']:.2g}"
            + ("" if m == "sgd" else f" ({st.loc[m, 'mean'] / base:.2f}× SGD)")
            for m in method_order(st.index)
        ]
        out.append(f"{what} averaged over all epochs: " + "; ".join(parts))
    return out


def sweep_findings(sweep: pd.DataFrame, final: pd.DataFrame) -> list[str]:
    """Per measure: SAF's range over the sweep against SGD's and SAM's final values, and
    (with ``sgd_<measure>_same_ce`` columns) SAF's final value over SGD's at the same
    training CE, beside SAM's ratio at those losses; with the ``..._paired`` and
    ``<ref>_tempered_<measure>`` columns, the same seed's ratios instead, and over SGD and SAM
    tempered to each run's final CE (:func:`_sweep_paired`)."""
    f = final.set_index("method")
    out = []
    for k, what in (("sam_sharpness", "SAM sharpness"), ("lambda_max", "lambda_max")):
        if k not in sweep.columns or f"{k}_mean" not in f.columns:
            continue
        refs = "; ".join(f"{m} {f.loc[m, f'{k}_mean']:.3g}" for m in ("SGD", "SAM") if m in f.index)
        out.append(f"Sweep, final {what} of SAF: {_sweep_range(sweep, k)}; {refs}")
        if f"sgd_{k}_same_ce_paired" in sweep and f"sgd_tempered_{k}" in sweep:
            out += _sweep_paired(sweep, k, what)
        elif f"sgd_{k}_same_ce" in sweep:
            r = sweep.assign(ratio=sweep[k] / sweep[f"sgd_{k}_same_ce"])
            sam = ""
            if f"sam_{k}_same_ce" in sweep:
                q = sweep[f"sam_{k}_same_ce"] / sweep[f"sgd_{k}_same_ce"]
                sam = f"; SAM over SGD at those losses: {q.min():.2f} to {q.max():.2f}"
            ce = sweep["checkpoint_ce"]
            out.append(
                f"Sweep, SAF's final {what} over SGD's at the same training CE ({ce.min():.3g} "
                f"to {ce.max():.3g}): {_sweep_range(r, 'ratio', '.2f')}{sam}"
            )
    return out


def _sweep_paired(sweep: pd.DataFrame, k: str, what: str) -> list[str]:
    """SAF's final ``k`` over the same seed's SGD (SAM) at the same training CE, and over its
    final model tempered to that CE, per (lambda, lag) (:func:`_paired_cells`)."""
    ce = sweep["checkpoint_ce"]
    out = [
        f"Sweep, SAF's final {what} over the same seed's SGD (SAM) where its training CE was "
        f"SAF's final CE ({ce.min():.3g} to {ce.max():.3g}; Hessians at the checkpoints "
        f"around it). SGD: {_paired_cells(sweep, k, f'sgd_{k}_same_ce_paired')}. SAM: "
        f"{_paired_cells(sweep, k, f'sam_{k}_same_ce_paired')}"
    ]
    out.append(
        f"Sweep, SAF's final {what} over the same seed's final SGD (SAM) model tempered to "
        f"SAF's final CE. SGD: {_paired_cells(sweep, k, f'sgd_tempered_{k}')}. SAM: "
        f"{_paired_cells(sweep, k, f'sam_tempered_{k}')}"
    )
    return out


def _paired_cells(sweep: pd.DataFrame, num: str, den: str) -> str:
    """Per (lambda, lag): ``num`` over ``den`` paired by seed (:func:`figures._stats.
    paired_ratio`), "r [95% CI] (n seeds)" where two seeds or more pair, else "r"."""
    if den not in sweep:
        return "n/a"
    parts = []
    for (lam, lag), g in sweep.groupby(["lam", "lag"]):
        r = paired_ratio(g[num], g[den])
        cell = "n/a" if r.n == 0 else f"{r.ratio:.2f}"
        cell += f" [{r.lo:.2f}, {r.hi:.2f}] ({r.n} seeds)" if r.n >= 2 else ""
        parts.append(f"lambda {lam:g} lag {lag}: {cell}")
    return "; ".join(parts)


def _sweep_range(sweep: pd.DataFrame, k: str, fmt: str = ".3g") -> str:
    g = sweep.groupby(["lam", "lag"])[k].mean().dropna()
    if g.empty:
        return "n/a (no run has a value)"
    lo, hi = g.idxmin(), g.idxmax()
    return (
        f"{g.min():{fmt}} (lambda={lo[0]:g}, lag={lo[1]}) to {g.max():{fmt}} "
        f"(lambda={hi[0]:g}, lag={hi[1]})"
    )


def matched_metrics(
    curves: pd.DataFrame,
    metrics: Sequence[str] = tuple(k for k, _ in MEASURES),
    levels: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Each measure at the common training-loss levels (:func:`figures._results.matched_loss`;
    ``levels`` None: the lowest every run reaches), mean and std over seeds and the ratio of
    means to SGD: rows ``level, method, metric, mean, std, n, vs_sgd``."""
    present = [k for k in metrics if (check_curves(curves)["metric"] == k).any()]
    m = matched_loss(curves, present, None if levels is None else list(levels))
    cols = ["level", "method", "metric", "mean", "std", "n", "vs_sgd"]
    if m.empty:
        return pd.DataFrame(columns=cols)
    st = mean_std(m, ["level", "metric", "method"])
    base = st[st.method == "sgd"].set_index(["level", "metric"])["mean"]
    st["vs_sgd"] = [r.mean / base.get((r.level, r.metric), float("nan")) for r in st.itertuples()]
    rank = {m: i for i, m in enumerate(method_order(st["method"]))}
    st = st.assign(rank=st["method"].map(rank)).sort_values(["level", "rank", "metric"])
    return st[cols].reset_index(drop=True)


def matched_findings(matched: pd.DataFrame, curves: pd.DataFrame | None = None) -> list[str]:
    """One sentence per measure at the lowest matched training loss, in numbers; with
    ``curves``, also the epoch at which each method was at that loss."""
    if matched.empty:
        return [
            "Matched training loss: the runs share no training-loss level at the analysed "
            "checkpoints, so no measure is compared at matched loss (train longer or analyse "
            "more checkpoints)."
        ]
    lv = matched["level"].min()
    at = matched[matched.level == lv]
    out = [
        f"Matched training loss: each measure where each run's training CE was {lv:.3g}, the "
        "lowest that every run reaches (interpolated in log-log between its analysed "
        "checkpoints, never extrapolated)."
    ]
    if curves is not None:
        ep = mean_std(epoch_at_loss(curves, lv).rename(columns={"epoch": "value"}), ["method"])
        last = int(check_curves(curves)["epoch"].max())
        ep = ep.set_index("method")
        parts = [
            f"{label(m)} {ep.loc[m, 'mean']:.1f} ± {ep.loc[m, 'std']:.1g}"
            for m in method_order(ep.index)
        ]
        out.append(
            f"Epoch at which each method was at training CE {lv:.3g} (of {last}; the "
            "learning rate and the schedule differ there): " + "; ".join(parts)
        )
    for k, what in MEASURES:
        r = at[at.metric == k]
        if r.empty:
            continue
        parts = [
            f"{label(x.method)} {x.mean:.3g} ± {x.std:.2g}"
            + ("" if x.method == "sgd" else f" ({x.vs_sgd:.2f}× SGD)")
            for x in r.itertuples()
        ]
        out.append(f"{what[0].upper() + what[1:]} at training CE {lv:.3g}: " + "; ".join(parts))
    return out


def matched_display(matched: pd.DataFrame) -> pd.DataFrame:
    """``matched_metrics`` as one row per level and method, "mean ± std (r× SGD)" cells."""
    rows = []
    for (lv, m), g in matched.groupby(["level", "method"], sort=False):
        row = {"training CE": f"{lv:.3g}", "method": label(m)}
        for x in g.itertuples():
            row[x.metric] = f"{x.mean:.3g} ± {x.std:.2g} ({x.vs_sgd:.2f}×)"
        rows.append(row)
    return pd.DataFrame(rows)


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0, classes="t")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
img{max-width:100%;border:1px solid #ddd} figure{margin:1.5em 0} figcaption{color:#555}
table.t{border-collapse:collapse;font-size:90%} table.t td,table.t th{padding:3px 8px;
border-bottom:1px solid #ddd;text-align:right} code{background:#f4f4f4;padding:1px 4px}"""

_SCRIPT = """<script>
window.addEventListener('load', function () {
  var ok = 0, bad = 0;
  document.querySelectorAll('img').forEach(function (i) {
    if (i.complete && i.naturalWidth > 0) { ok++; } else { bad++; }
  });
  document.body.setAttribute('data-images-ok', ok);
  document.body.setAttribute('data-images-broken', bad);
});
</script>"""


VERDICT_NOTE = (
    "Each cell: the method's measure over the reference's, seed by seed (the same seed gives "
    "every method the same initialisation and data order), as the geometric mean of the "
    "per-seed ratios with its 95% t interval; p: paired t-test of the log-ratios; Holm: "
    "adjusted over every row of this table; significant: Holm p < 0.05; seeds for 80% power: "
    "what a paired t-test would need at the observed effect and level 0.05/(rows) (noncentral "
    "t; Holm's strictest step). Below 1 is flatter."
)


def write_report(
    out: str | os.PathLike,
    sections: Sequence[Section],
    tables: Mapping[str, pd.DataFrame],
    settings: Mapping[str, object],
    notes: Sequence[str] = (),
    title: str = "Does SAF flatten minima like SAM?",
    verdict: pd.DataFrame | None = None,
    key: Sequence[Section] = (),
    header: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<out>/index.html`` with relative links to the figures (atomic write).

    The page leads with the verdict: ``header`` (date, version, command), the ``verdict``
    table and the ``key`` figures; then the other tables, figures, ``notes`` and settings.
    """
    out = Path(out)
    esc = html.escape
    rel = lambda p: esc(os.path.relpath(p, out).replace(os.sep, "/"))  # noqa: E731

    def figure(s: Section) -> str:
        links = " · ".join(f'<a href="{rel(p)}">{esc(p.suffix[1:].upper())}</a>' for p in s.links)
        return (
            f'<figure><h2>{esc(s.title)}</h2><img src="{rel(s.png)}" alt="{esc(s.title)}">'
            f"<figcaption>{esc(s.caption)} {links}</figcaption></figure>"
        )

    body = [f"<h1>{esc(title)}</h1>"]
    if header:
        body.append("<p>" + " · ".join(f"{esc(k)}: <code>{esc(v)}</code>"
                                       for k, v in header.items()) + "</p>")  # fmt: skip
    if verdict is not None:
        body.append(f"<h2>Verdict</h2><p>{esc(VERDICT_NOTE)}</p>{_table_html(verdict)}")
    body += [figure(s) for s in key]
    for name, df in tables.items():
        body.append(f"<h2>{esc(name)}</h2>{_table_html(df)}")
    body += [figure(s) for s in sections]
    if notes:
        body.append("<h2>What the numbers say</h2><ul>")
        body += [f"<li>{esc(n)}</li>" for n in notes]
        body.append("</ul>")
    rows = "".join(
        f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in settings.items()
    )
    body.append(f'<h2>Settings</h2><table class="t">{rows}</table>')
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + f"\n{_SCRIPT}</body></html>\n"
    )
    path = out / "index.html"
    atomic_write_text(path, page)
    return path


def write_final_table(curves: pd.DataFrame, out: str | os.PathLike) -> pd.DataFrame:
    """Write ``final_metrics.csv/.md`` (last-epoch metrics per method) and return the table."""
    final = final_metrics(curves)
    save_table(final, Path(out) / "final_metrics")
    return final
