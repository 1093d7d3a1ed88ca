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
