r"""The verdict: each method's flatness over SGD and over the controls, seed by seed.

One row per method x measure x reference (:func:`verdict_table`): the geometric mean of the
per-seed ratios with its 95% t interval, the paired t-test's p, Holm's adjusted p over every
row of the table (the headline cells) and the seeds 80% power would need
(:mod:`figures._stats`) for the observed effect at Bonferroni's level 0.05/m over the m rows
(Holm's first step, the strictest). References:

* **SGD, last epoch**: both at their final checkpoints;
* **SGD at matched CE**: both where their training CE was the lowest level every run reaches
  (:func:`figures._results.matched_loss`);
* **SGD / SAM, temperature-matched**: the reference's final model with its last layer
  rescaled so its training CE equals the method's (:mod:`figures._controls`);
* **SGD + label smoothing** (SAF only): SGD trained with a smoothing chosen to end near
  SAF's final CE (:func:`figures._stages.smoothing_runs`).

``ce_ratio`` is the method's training CE over the reference's (geometric mean over the seeds):
how well the reference is matched in loss (1 at matched CE and, by construction, for the
temperature-matched references).
"""

from __future__ import annotations

import math

import pandas as pd

from figures._results import check_curves, common_loss_range, matched_loss
from figures._save import label
from figures._stats import ALPHA, holm, paired_ratio, seeds_for_power

HEADLINE = ("lambda_max", "sam_sharpness")
METHODS = ("sam", "saf", "mesa")
LS = "sgd_ls"
COLUMNS = ["method", "measure", "reference", "ratio", "lo", "hi", "p", "p_holm", "significant",
           "n", "seeds_needed", "ce_ratio"]  # fmt: skip


def final_values(curves: pd.DataFrame, metric: str) -> pd.Series:
    """Each run's value of ``metric`` at its last epoch, indexed by ``(method, seed)``."""
    c = check_curves(curves)
    c = c[c["metric"] == metric].dropna(subset=["value"])
    last = c[c["epoch"] == c.groupby(["method", "seed"])["epoch"].transform("max")]
    return last.set_index(["method", "seed"])["value"].sort_index()


def _pair(a: pd.Series, b: pd.Series):
    """Values of the seeds both series hold (indexed by seed), in seed order."""
    seeds = sorted(set(a.index) & set(b.index))
    return a.loc[seeds].to_numpy(), b.loc[seeds].to_numpy()


def _seeds(s: pd.Series, method: str) -> pd.Series:
    return s.xs(method, level="method") if method in s.index.get_level_values(0) else s.iloc[:0]


def matched_level(curves: pd.DataFrame, measures=HEADLINE) -> float | None:
    """The lowest training CE every run reaches at checkpoints with every measure."""
    r = common_loss_range(curves, [m for m in measures if (curves["metric"] == m).any()])
    return None if r is None else r[0]


def verdict_table(
    curves: pd.DataFrame,
    temperature: pd.DataFrame | None = None,
    level: float | None = None,
    measures=HEADLINE,
) -> pd.DataFrame:
    """The verdict table (see the module docstring): rows :data:`COLUMNS`.

    Args:
        curves: the study's tidy curves (``sgd_ls`` rows for the label-smoothing control).
        temperature: :func:`figures._stages.temperature_controls`' table, or None.
        level: the matched training CE (None: :func:`matched_level`).
    """
    curves = curves[curves["metric"].isin([*measures, "checkpoint_ce"])]  # the rest is unused
    level = matched_level(curves, measures) if level is None else level
    ce = final_values(curves, "checkpoint_ce")
    rows = []
    for k in measures:
        final = final_values(curves, k)
        at = matched_loss(curves, [k], [level] if level else [])
        at = at.set_index(["method", "seed"])["value"]
        for m in [m for m in METHODS if m in final.index.get_level_values(0)]:
            for name, a, b, ce_b in _references(m, k, final, at, ce, temperature, level):
                r = paired_ratio(*_pair(a, b))
                ce_r = paired_ratio(*_pair(_seeds(ce, m), ce_b)).ratio if ce_b is not None else 1.0
                if r.n:
                    rows.append([m, k, name, r.ratio, r.lo, r.hi, r.p, math.nan, False, r.n,
                                 r.effect, ce_r])  # the effect becomes seeds_needed  # fmt: skip
    out = pd.DataFrame(rows, columns=COLUMNS)
    out["p_holm"] = holm(out["p"].to_numpy()) if len(out) else []
    out["significant"] = out["p_holm"] < ALPHA
    m = max(1, int(out["p"].notna().sum()))  # Bonferroni's alpha / m: Holm never needs less
    out["seeds_needed"] = [seeds_for_power(e, ALPHA / m) for e in out["seeds_needed"]]
    return out


def _references(m, k, final, at, ce, temperature, level):
    """``(name, method's values, reference's values, reference's CE or None for "matched")``
    per seed, for one method and measure."""
    mine = _seeds(final, m)
    refs = [("SGD, last epoch", mine, _seeds(final, "sgd"), _seeds(ce, "sgd"))]
    if level:
        refs.append((f"SGD at matched CE {level:.3g}", _seeds(at, m), _seeds(at, "sgd"), None))
    for base in ("sgd", "sam"):
        if temperature is not None and len(temperature) and base != m:
            t = temperature[(temperature.base == base) & (temperature.target == m)]
            t = t.set_index("seed")
            refs.append((f"{label(base)}, temperature-matched", mine, t[k], t["checkpoint_ce"]))
    if m == "saf":
        refs.append(("SGD + label smoothing", mine, _seeds(final, LS), _seeds(ce, LS)))
    return refs


def _g(v: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}g}"


def verdict_display(v: pd.DataFrame) -> pd.DataFrame:
    """The verdict at 2-3 significant digits: "ratio [lo, hi]", p, Holm p, seeds needed."""
    return pd.DataFrame(
        {
            "method": [label(m) for m in v["method"]],
            "measure": v["measure"],
            "against": v["reference"],
            "ratio [95% CI]": [
                f"{_g(r)} [{_g(a)}, {_g(b)}]" for r, a, b in zip(v.ratio, v.lo, v.hi, strict=True)
            ],  # fmt: skip
            "p": [_g(p, 2) for p in v["p"]],
            "p (Holm)": [_g(p, 2) for p in v["p_holm"]],
            "significant": ["yes" if s else "no" for s in v["significant"]],
            "seeds": v["n"],
            "seeds for 80% power": [
                "∞" if not math.isfinite(n) else str(int(n)) for n in v["seeds_needed"]
            ],
            "CE over the reference's": [_g(c) for c in v["ce_ratio"]],
        }
    )
