"""Paired comparisons over seeds: the mean difference, its 95% interval and a two-sided paired t-test.

Two variants trained with the same seed see the same data order and start from the same random state for
every part they share, so a comparison pairs them seed by seed: the noise common to both cancels, and the
test asks whether the per-seed differences are centred away from zero.

    >>> r = paired([0.80, 0.81, 0.79, 0.80, 0.82], [0.81, 0.83, 0.80, 0.81, 0.83])
    >>> round(r.t, 3), r.verdict
    (6.0, 'better')

Student's t distribution is computed here (regularised incomplete beta, bisection for quantiles), so the
benchmarks need nothing beyond the standard library.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes, betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on the CDF)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float  # mean of variant - base over seeds
    sd: float  # standard deviation of the differences
    t: float
    p: float  # two-sided
    low: float  # 95% interval of the mean difference
    high: float

    @property
    def verdict(self) -> str:
        """better / worse when the 95% interval excludes zero (p < 0.05), else within noise."""
        if self.n < 2 or not self.low > 0 and not self.high < 0:
            return "within noise"
        return "better" if self.mean > 0 else "worse"


def paired(base: list[float], variant: list[float], level: float = 0.95) -> Paired:
    """Paired t-test of ``variant`` against ``base`` (the i-th of each from the same seed)."""
    if len(base) != len(variant):
        raise ValueError(f"paired values need the same seeds: {len(base)} base, {len(variant)} variant")
    diffs = [v - b for b, v in zip(base, variant, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else float("nan")
    if n < 2:
        return Paired(n, mean, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    if se == 0:
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if mean else 1.0
        return Paired(n, mean, sd, t, p, mean, mean)
    t = mean / se
    p = 2.0 * (1.0 - t_cdf(abs(t), n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return Paired(n, mean, sd, t, p, mean - half, mean + half)
