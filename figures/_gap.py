r"""Does flatness predict the generalization gap? Rank correlations over the final models.

A run's **gap** is its final test cross-entropy minus its final training cross-entropy,

.. math:: \mathrm{gap} = \mathrm{CE}_{\text{test}} - \mathrm{CE}_{\text{train}},

both of the last checkpoint in eval mode and both plain CE (also for the label-smoothing
control): the trainer's ``test_loss`` (the whole test set) and the analysis'
``checkpoint_ce`` (the analysed training samples). The trainer's ``train_acc`` is a running
mean over the last epoch in train mode, not the final model's, so the accuracy gap is not
used. Each final flatness measure is set against the gap with Spearman's :math:`\rho`
over the runs and a bootstrap interval that resamples whole seeds
(:func:`figures._stats.spearman_ci`): pooled over methods and seeds, and within seeds
(:func:`within_seeds`), since a seed's initialisation and data order move every method's
gap together and can hide, or fake, a relation between the methods.
"""

from __future__ import annotations

import math

import pandas as pd

from figures._save import label, method_order
from figures._stats import spearman_ci
from figures._verdict import final_values

GAP_MEASURES = (
    ("lambda_max", "Hessian lambda_max"),
    ("trace", "Hessian trace"),
    ("sam_sharpness", "SAM sharpness (rho=0.05)"),
)
GAP = "test CE - training CE of the last checkpoint, eval mode"
CONTROL = "sgd_ls"
WITHIN = "methods, within seeds"
COLUMNS = ["runs", "measure", "spearman", "lo", "hi", "n_runs", "n_seeds", "gap"]


def gap_points(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``method, seed``, its final flatness measures and ``gap``
    (the module docstring); NaN where a run lacks a value."""
    names = [k for k, _ in GAP_MEASURES] + ["test_loss", "checkpoint_ce"]
    df = pd.concat([final_values(curves, k).rename(k) for k in names], axis=1)
    df = df.rename_axis(["method", "seed"]).reset_index()
    return df.assign(gap=df["test_loss"] - df["checkpoint_ce"])


def within_seeds(points: pd.DataFrame) -> pd.DataFrame:
    """``points`` with each measure and the gap less its seed's mean over the runs given: what
    is left once a seed's shared effect (its initialisation, its data order) is removed."""
    cols = [k for k, _ in GAP_MEASURES] + ["gap"]
    return points.assign(**{c: points[c] - points.groupby("seed")[c].transform("mean")
                            for c in cols})  # fmt: skip


def _sets(points: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The sets of runs correlated: the methods', the same within seeds, and (when present)
    with the label-smoothing control's."""
    methods = points[points["method"] != CONTROL]
    sets = [("methods", methods), (WITHIN, within_seeds(methods))]
    if (points["method"] == CONTROL).any():
        sets.append(("methods + SGD label smoothing", points))
    return sets


def gap_correlations(curves: pd.DataFrame, seed: int = 0, n_boot: int = 2000) -> pd.DataFrame:
    """Spearman's rho of each final flatness measure against the gap, with its 95% interval
    (seeds resampled whole, ``analysis.rng`` stream ``(seed, "bootstrap")``), over the
    methods' runs, the same :func:`within_seeds`, and with the label-smoothing control's
    runs: rows :data:`COLUMNS`."""
    rows = []
    for name, p in _sets(gap_points(curves)):
        for k, _ in GAP_MEASURES:
            c = spearman_ci(p[k], p["gap"], p["seed"], n_boot=n_boot, seed=seed)
            rows.append([name, k, c.rho, c.lo, c.hi, c.n, c.groups, GAP])
    return pd.DataFrame(rows, columns=COLUMNS)


def gap_findings(table: pd.DataFrame, points: pd.DataFrame) -> list[str]:
    """One sentence per set of runs: each measure's rho [95% CI] against the gap, and n."""
    out = []
    for name, p in _sets(points):
        g = table[table["runs"] == name]
        if g.empty:
            continue
        who = ", ".join(label(m) for m in method_order(set(p["method"])))
        cells = "; ".join(
            f"{dict(GAP_MEASURES)[r.measure]} {r.spearman:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}]"
            for r in g.itertuples()
        )
        n = int(g["n_seeds"].max())
        few = f"; {n} seeds give only {math.comb(2 * n - 1, n)} distinct resamples" * (n < 6)
        how = ("each run's measure and gap less its seed's mean over the methods" if name ==
               WITHIN else "pooled")  # fmt: skip
        out.append(
            f"Flatness against the generalization gap ({GAP}): Spearman rho over the final "
            f"models of {who}, {how} ({g['n_runs'].max()} runs, {n} seeds; 95% CI: bootstrap "
            f"resampling whole seeds{few}): {cells}"
        )
    return out
