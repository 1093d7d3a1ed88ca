"""Tidy tables the recipes read: curves per epoch, summaries over seeds, surfaces.

Every recipe reads one of these shapes, so recipes can be tested on small
synthetic tables and the pipeline only has to produce them:

* **curves**: one row per ``(method, seed, epoch, metric)`` with a ``value``;
  training metrics (``train_ce``, ``test_acc``, ...) and analysis metrics
  (``lambda_max``, ``trace``, ``sam_sharpness``, ...) side by side.
* **surfaces**: ``{method: Grid}``, a loss surface on a regular grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

CURVE_COLUMNS = ("method", "seed", "epoch", "metric", "value")


@dataclass(frozen=True)
class Grid:
    """A loss surface on a regular grid: ``values[i, j]`` is the loss at ``(x[j], y[i])``.

    A 1D surface has ``y`` of length 1 and ``values`` of shape ``(1, len(x))``.
    """

    x: np.ndarray
    y: np.ndarray
    values: np.ndarray

    def __post_init__(self):
        v = np.asarray(self.values, dtype=float)
        if v.shape != (len(self.y), len(self.x)):
            raise ValueError(
                f"surface values have shape {v.shape}, expected (len(y), len(x)) = "
                f"({len(self.y)}, {len(self.x)})"
            )

    def center_slices(self) -> tuple[np.ndarray, np.ndarray]:
        """The 1D slices through the grid point nearest the origin: (along x, along y)."""
        i = int(np.argmin(np.abs(self.y)))
        j = int(np.argmin(np.abs(self.x)))
        v = np.asarray(self.values, dtype=float)
        return v[i, :], v[:, j]


def check_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Check that ``curves`` has the tidy columns; return it with numeric values."""
    missing = [c for c in CURVE_COLUMNS if c not in curves.columns]
    if missing:
        raise ValueError(
            f"curves table lacks columns {missing}; expected {list(CURVE_COLUMNS)} "
            "(one row per method, seed, epoch and metric)"
        )
    out = curves.copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out


def mean_std(df: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    r"""Mean, sample standard deviation (ddof=1; 0 for one seed) and count per group.

    .. math:: \bar v = \frac1n\sum_s v_s,\quad
              \mathrm{std} = \sqrt{\tfrac1{n-1}\sum_s (v_s-\bar v)^2}

    NaN values (failed or skipped measurements) are left out of each group.

    >>> t = pd.DataFrame({"m": ["a", "a"], "value": [1.0, 3.0]})
    >>> mean_std(t, ["m"]).to_dict("records")
    [{'m': 'a', 'mean': 2.0, 'std': 1.4142135623730951, 'n': 2}]
    """
    g = df.dropna(subset=[value]).groupby(by, sort=True)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out.rename(columns={"count": "n"})


def metric_curves(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and std over seeds of one metric, per method and epoch."""
    sub = check_curves(curves)
    sub = sub[sub["metric"] == metric]
    return mean_std(sub, ["method", "epoch"])


def melt_metrics(metrics: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    """A trainer's ``metrics.csv`` (one row per epoch) as tidy curve rows."""
    cols = [c for c in metrics.columns if c != "epoch"]
    long = metrics.melt(id_vars=["epoch"], value_vars=cols, var_name="metric")
    long.insert(0, "seed", int(seed))
    long.insert(0, "method", method)
    return long[list(CURVE_COLUMNS)]
