r"""Paired-seed statistics of the verdict: log-ratios, t intervals, Holm, seeds for power.

Every method of a seed starts from the same initialisation and sees the same data order
(the trainer's per-seed streams), so a method and its reference are compared seed by seed:
:math:`d_s = \log(m_{\text{method},s} / m_{\text{reference},s})`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from analysis.rng import stream_seed

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class PairedRatio:
    """A method's measure over a reference's, seed by seed (:func:`paired_ratio`)."""

    ratio: float
    lo: float
    hi: float
    p: float
    n: int
    seeds_needed: float
    effect: float = math.nan  # mean over sd of the log-ratios


def paired_ratio(x, y, confidence: float = 1 - ALPHA) -> PairedRatio:
    r"""Geometric-mean ratio of paired positive values, its t interval and paired t-test.

    With :math:`d_s = \log(x_s/y_s)`, :math:`\bar d` their mean and :math:`s_d` their
    sample standard deviation over :math:`n` seeds,

    .. math:: r = e^{\bar d},\quad
              [e^{\bar d - t_{1-\alpha/2,\,n-1} s_d/\sqrt n},\;
               e^{\bar d + t_{1-\alpha/2,\,n-1} s_d/\sqrt n}],

    ``p`` the two-sided one-sample t-test of :math:`\bar d = 0` (Student 1908),
    ``effect`` :math:`\bar d / s_d` and ``seeds_needed`` its :func:`seeds_for_power`. Pairs with
    a non-positive or non-finite value are left out; fewer than two pairs give NaN bounds.

    >>> r = paired_ratio([2.0, 4.0, 2.0], [1.0, 2.0, 1.0])  # every seed exactly 2x
    >>> round(r.ratio, 12), r.n
    (2.0, 3)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal shapes, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    d = np.log(x[ok] / y[ok])
    n = d.size
    if n == 0:
        return PairedRatio(*(math.nan,) * 4, 0, math.nan)
    mean = float(d.mean())
    if n < 2:
        return PairedRatio(math.exp(mean), math.nan, math.nan, math.nan, 1, math.nan)
    sd = float(d.std(ddof=1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if sd > 0 else float(mean == 0)
    need = seeds_for_power(mean / sd) if sd > 0 else 2.0
    effect = mean / sd if sd > 0 else math.copysign(math.inf, mean)
    return PairedRatio(
        math.exp(mean), math.exp(mean - half), math.exp(mean + half), p, n, need, effect
    )


def seeds_for_power(effect: float, alpha: float = ALPHA, power: float = POWER) -> float:
    r"""Smallest number of seeds :math:`n \ge 2` at which a two-sided paired t-test of
    level :math:`\alpha` detects the standardized effect :math:`\delta = \bar d / s_d` with
    probability ``power``, from the noncentral t distribution (exact, no normal
    approximation):

    .. math:: 1 - F_{t'}(t_{1-\alpha/2,\,n-1};\, n-1,\, \delta\sqrt n)
              + F_{t'}(-t_{1-\alpha/2,\,n-1};\, n-1,\, \delta\sqrt n) \ge \text{power}.

    ``inf`` for no effect (or more than 10,000 seeds), 2 for an infinite one (no spread).

    >>> seeds_for_power(1.0)  # Cohen's d = 1: 10 pairs (G*Power gives 10 as well)
    10.0
    """
    delta = abs(float(effect))
    if math.isnan(delta) or delta == 0:
        return math.inf
    if math.isinf(delta):
        return 2.0

    def enough(n: int) -> bool:
        crit = stats.t.ppf(1 - alpha / 2, n - 1)
        nc = delta * math.sqrt(n)
        got = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
        return bool(np.nan_to_num(got, nan=1.0) >= power)  # NaN only far in the tail: ~1

    lo, hi = 1, 2  # power grows with n: double until enough, then bisect
    while not enough(hi):
        lo, hi = hi, 2 * hi
        if hi > 10_000:
            return math.inf
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return float(hi)


def holm(p) -> np.ndarray:
    r"""Holm's (1979) step-down adjusted p-values: with the :math:`m` finite p-values sorted,
    :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m-j+1)\,p_{(j)})`. NaN stays NaN.

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


@dataclass(frozen=True)
class Correlation:
    """A rank correlation and its bootstrap interval (:func:`spearman_ci`)."""

    rho: float
    lo: float
    hi: float
    n: int  # points
    groups: int  # seeds


def spearman(x, y) -> float:
    r"""Spearman's (1904) rank correlation: Pearson's correlation of the ranks, ties sharing
    their mean rank,

    .. math:: \rho = \frac{\sum_i (r_i - \bar r)(s_i - \bar s)}
              {\sqrt{\sum_i (r_i - \bar r)^2 \sum_i (s_i - \bar s)^2}},

    which without ties is :math:`1 - 6\sum_i (r_i - s_i)^2 / (n(n^2 - 1))`. NaN when either
    side is constant (or has fewer than two points).

    >>> spearman([1, 2, 3, 4], [1, 8, 27, 64]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    r = stats.rankdata(np.asarray(x, dtype=float)) - (len(x) + 1) / 2
    s = stats.rankdata(np.asarray(y, dtype=float)) - (len(y) + 1) / 2
    den = math.sqrt(float(r @ r) * float(s @ s))
    return float(r @ s) / den if den > 0 else math.nan


def spearman_ci(
    x, y, groups, confidence: float = 1 - ALPHA, n_boot: int = 2000, seed: int = 0
) -> Correlation:
    r"""Spearman's :math:`\rho` of paired points (:func:`spearman`) and a percentile bootstrap
    interval that resamples whole groups with replacement (a cluster bootstrap: Davison and
    Hinkley 1997, Sec. 3.8). With ``groups`` the seeds, every method of a drawn seed comes
    along (one seed gives every method the same initialisation and data order, so its points
    are not independent). The interval holds the central ``confidence`` of the resampled
    :math:`\rho` (resamples with a constant side are left out); NaN bounds with fewer than
    two groups. Draws: ``analysis.rng`` stream ``(seed, "bootstrap")``. Points with a
    non-finite value are left out.

    >>> c = spearman_ci([1, 2, 3, 4], [2, 4, 6, 8], groups=[0, 0, 1, 1])
    >>> c.rho, c.lo, c.hi, c.n, c.groups
    (1.0, 1.0, 1.0, 4, 2)
    """
    x, y, g = (np.asarray(v) for v in (x, y, groups))
    if not (0 < confidence < 1 and n_boot >= 1):
        raise ValueError(f"need 0 < confidence < 1 and n_boot >= 1, got {confidence}, {n_boot}")
    if not x.shape == y.shape == g.shape or x.ndim != 1:
        raise ValueError(
            f"x, y and groups need one equal length, got {x.shape}, {y.shape}, {g.shape}"
        )
    ok = np.isfinite(x.astype(float)) & np.isfinite(y.astype(float))
    x, y, g = x[ok].astype(float), y[ok].astype(float), g[ok]
    ids = np.unique(g)
    rho = spearman(x, y) if x.size >= 2 else math.nan
    if ids.size < 2 or math.isnan(rho):
        return Correlation(rho, math.nan, math.nan, int(x.size), int(ids.size))
    members = [np.flatnonzero(g == k) for k in ids]
    rng = np.random.default_rng(stream_seed(seed, "bootstrap"))
    boot = []
    for _ in range(n_boot):
        pick = np.concatenate([members[i] for i in rng.integers(ids.size, size=ids.size)])
        boot.append(spearman(x[pick], y[pick]))
    boot = np.array(boot)[np.isfinite(boot)]  # a resample of one seed can be constant
    if not boot.size:
        return Correlation(rho, math.nan, math.nan, int(x.size), int(ids.size))
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Correlation(rho, float(lo), float(hi), int(x.size), int(ids.size))
