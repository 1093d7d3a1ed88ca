"""Tidy tables the recipes read: curves per epoch, summaries over seeds, surfaces.

Every recipe reads one of these shapes, so recipes can be tested on small
synthetic tables and the pipeline only has to produce them:

* **curves**: one row per ``(method, seed, epoch, metric)`` with a ``value``;
  training metrics (``train_ce``, ``test_acc``, ...) and analysis metrics
  (``lambda_max``, ``trace``, ``sam_sharpness``, ...) side by side.
* **surfaces**: ``{method: Grid}``, a loss surface on a regular grid.
"""

from __future__ import annotations

import math
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


def band_stats(df: pd.DataFrame, by: list[str], log: bool = False) -> pd.DataFrame:
    r"""Centre line and band per group: ``mean``, ``lo``, ``hi``, ``n``.

    Linear axes: the arithmetic mean and mean :math:`\pm` one standard deviation
    (:func:`mean_std`). Log axes: the geometric mean
    :math:`\exp(\frac1n\sum_s \log v_s)` and the min--max over seeds, which stay positive
    (a mean :math:`\pm` std band can cross zero and fall off a log axis); values
    :math:`\le 0` are left out there.

    >>> t = pd.DataFrame({"m": ["a", "a"], "value": [1.0, 100.0]})
    >>> band_stats(t, ["m"], log=True)[["mean", "lo", "hi", "n"]].round(9).to_dict("records")
    [{'mean': 10.0, 'lo': 1.0, 'hi': 100.0, 'n': 2}]
    """
    if not log:
        s = mean_std(df, by)
        return s.assign(lo=s["mean"] - s["std"], hi=s["mean"] + s["std"])
    d = df.dropna(subset=["value"])
    d = d[d["value"] > 0].assign(logv=lambda t: np.log(t["value"]))
    g = d.groupby(by, sort=True)
    out = g["logv"].mean().apply(np.exp).rename("mean").to_frame()
    out["lo"], out["hi"], out["n"] = g["value"].min(), g["value"].max(), g["value"].count()
    return out.reset_index()


# -- matched training loss -----------------------------------------------------------------


def at_loss(loss, value, level: float, log_value: bool = True) -> float:
    r"""A measure's value when a run's training loss was ``level``, interpolated in log-log.

    ``loss`` and ``value`` are one run's analysed checkpoints in epoch order. Between the
    two consecutive checkpoints whose losses bracket ``level`` (the latest such pair, so
    the value belongs to the run's last visit to that loss),

    .. math:: \log v = \log v_i + \frac{\log \ell - \log \ell_i}{\log \ell_{i+1} - \log \ell_i}
              (\log v_{i+1} - \log v_i),

    exact for a power law :math:`v = a\,\ell^b` on the segment. Where an end of the pair
    is not positive (a sharpness estimate can be), :math:`v` itself is interpolated
    linearly in :math:`\log \ell`. Checkpoints with a non-finite or non-positive loss, or
    a non-finite value, are left out. ``log_value=False`` interpolates :math:`v` linearly in
    :math:`\log \ell` throughout (for an epoch, say).

    Raises:
        ValueError: ``level`` lies outside the run's range of losses (no extrapolation).

    >>> round(at_loss([1.0, 0.01], [4.0, 0.04], 0.1), 12)  # v = 4 loss: 0.4 at loss 0.1
    0.4
    """
    x = np.asarray(loss, dtype=float)
    y = np.asarray(value, dtype=float)
    ok = np.isfinite(x) & (x > 0) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not (math.isfinite(level) and level > 0):
        raise ValueError(f"loss level must be a finite number > 0, got {level}")
    if x.size == 0:
        raise ValueError("no checkpoint with a finite loss and value")
    if not x.min() <= level <= x.max():
        raise ValueError(
            f"loss level {level:.4g} lies outside this run's range [{x.min():.4g}, "
            f"{x.max():.4g}]; refusing to extrapolate"
        )
    lx, t = np.log(x), math.log(level)
    for i in range(x.size - 1, -1, -1):  # the latest checkpoint or segment that holds level
        if x[i] == level:
            return float(y[i])
        if i + 1 < x.size and min(lx[i], lx[i + 1]) <= t <= max(lx[i], lx[i + 1]):
            f = (t - lx[i]) / (lx[i + 1] - lx[i])
            if log_value and y[i] > 0 and y[i + 1] > 0:
                return float(math.exp(math.log(y[i]) + f * (math.log(y[i + 1]) - math.log(y[i]))))
            return float(y[i] + f * (y[i + 1] - y[i]))
    raise AssertionError("unreachable: level lies within the range")  # pragma: no cover


def loss_trajectories(curves: pd.DataFrame, metric: str, loss: str = "checkpoint_ce") -> dict:
    """Per run ``(method, seed)``: the losses and values at checkpoints that have both."""
    c = check_curves(curves)
    wide = c[c["metric"].isin([metric, loss])].pivot_table(
        index=["method", "seed", "epoch"], columns="metric", values="value", aggfunc="first"
    )
    if metric not in wide.columns or loss not in wide.columns:
        return {}
    wide = wide.dropna(subset=[metric, loss]).sort_index()
    wide = wide[(wide[loss] > 0) & np.isfinite(wide[loss])]
    return {
        run: (g[loss].to_numpy(), g[metric].to_numpy())
        for run, g in wide.groupby(level=["method", "seed"], sort=True)
    }


def common_loss_range(
    curves: pd.DataFrame, metrics: list[str], loss: str = "checkpoint_ce"
) -> tuple[float, float] | None:
    """The training-loss interval that every run visits at checkpoints with every metric.

    ``(lowest, highest)``: ``lowest`` is the largest of the runs' smallest losses (the
    lowest loss that every run reaches), ``highest`` the smallest of their largest. None
    when the runs share no level.
    """
    lows, highs = [], []
    for metric in metrics:
        for x, _ in loss_trajectories(curves, metric, loss).values():
            lows.append(float(x.min()))
            highs.append(float(x.max()))
    if not lows or max(lows) > min(highs):
        return None
    return max(lows), min(highs)


def epoch_at_loss(curves: pd.DataFrame, level: float, loss: str = "checkpoint_ce") -> pd.DataFrame:
    """When each run's training loss was ``level`` (its latest visit): rows ``method, seed,
    epoch``, the epoch interpolated linearly in log loss between checkpoints; runs that never
    visit the level are left out.

    At a matched loss, methods can sit at different points of the schedule (a run that
    keeps its loss high meets the others' earlier, higher-learning-rate checkpoints), which
    this makes visible.
    """
    c = check_curves(curves)
    c = c[c["metric"] == loss].dropna(subset=["value"])
    rows = []
    for (method, seed), g in c.groupby(["method", "seed"], sort=True):
        g = g.sort_values("epoch")
        x, e = g["value"].to_numpy(), g["epoch"].to_numpy(dtype=float)
        ok = x[(x > 0) & np.isfinite(x)]
        if ok.size and ok.min() <= level <= ok.max():
            rows.append((method, seed, at_loss(x, e, level, log_value=False)))
    return pd.DataFrame(rows, columns=["method", "seed", "epoch"])


def matched_loss(
    curves: pd.DataFrame,
    metrics: list[str],
    levels: list[float] | None = None,
    loss: str = "checkpoint_ce",
) -> pd.DataFrame:
    """Each run's measures at common training-loss levels (:func:`at_loss` per run).

    Args:
        curves: tidy curves with the ``loss`` metric and ``metrics`` at the same epochs.
        levels: the loss levels; None: the lowest loss that every run reaches
            (:func:`common_loss_range`). Higher levels are reached early in training, where
            checkpoints are sparse against the loss's fall (a Hessian every few epochs can
            bracket a decade of loss), so the default keeps to the lowest.

    Returns:
        Rows ``method, seed, metric, level, value``. A run that never visits a level has
        no row for it (never an extrapolated value); no rows when the runs share no level.
    """
    if levels is None:
        r = common_loss_range(curves, metrics, loss)
        levels = [] if r is None else [r[0]]
    rows = []
    for metric in metrics:
        for (method, seed), (x, y) in loss_trajectories(curves, metric, loss).items():
            for level in levels:
                if x.min() <= level <= x.max():
                    rows.append((method, seed, metric, float(level), at_loss(x, y, level)))
    return pd.DataFrame(rows, columns=["method", "seed", "metric", "level", "value"])


def matched_levels(
    curves: pd.DataFrame, n: int = 4, span: float = 10.0, loss: str = "checkpoint_ce"
) -> list[float]:
    """``n`` training-loss levels for matched comparisons, geometrically spaced from the lowest
    loss every run reaches up to ``span`` times it (or the highest loss every run visits, if
    lower): the sensitivity of a matched comparison to the level chosen. Empty when the runs
    share no level.

    >>> c = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3, "seed": 0, "epoch": [0, 1, 2] * 2,
    ...                   "metric": "checkpoint_ce", "value": [2.0, 0.5, 0.1, 2.0, 0.4, 0.2]})
    >>> [round(v, 6) for v in matched_levels(c, n=3, span=4)]
    [0.2, 0.4, 0.8]
    """
    c = check_curves(curves)
    c = c[(c["metric"] == loss) & (c["value"] > 0)].dropna(subset=["value"])
    if c.empty:
        return []
    g = c.groupby(["method", "seed"])["value"]
    lo, hi = float(g.min().max()), float(g.max().min())
    if lo > hi:
        return []
    return [float(v) for v in np.geomspace(lo, min(hi, span * lo), n)] if hi > lo else [lo]


def bracketing_epochs(epochs, loss, levels) -> set[int]:
    """The checkpoints around each level: per level, both ends of the latest pair of
    consecutive checkpoints whose losses bracket it (the pair :func:`at_loss` interpolates
    on), so a measure taken there is interpolated between neighbouring epochs.

    >>> sorted(bracketing_epochs([0, 1, 2, 3], [2.0, 1.0, 0.5, 0.25], [0.7, 0.25]))
    [1, 2, 3]
    """
    e, x = np.asarray(epochs), np.asarray(loss, dtype=float)
    out: set[int] = set()
    for level in levels:
        for i in range(x.size - 1, -1, -1):
            if x[i] == level:
                out.add(int(e[i]))
                break
            if i + 1 < x.size and min(x[i], x[i + 1]) <= level <= max(x[i], x[i + 1]):
                out |= {int(e[i]), int(e[i + 1])}
                break
    return out
