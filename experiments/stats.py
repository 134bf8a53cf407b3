"""Seeds into table cells: mean +- the half-width of a Student-t 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds and the half-width of its confidence interval (NaN for n < 2)."""

    mean: float
    half_width: float
    n: int

    def format(self, digits: int = 2) -> str:
        """``3.12 ± 0.04 (n=3)``; ``3.12 (n=1)`` for one seed; ``n/a`` for none."""
        if self.n == 0:
            return "n/a"
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} (n={self.n})"


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Estimate:
    """Mean and t-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` (s: the sample std, ddof=1).

    NaN and None values are dropped (a seed that has no value does not count).
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Estimate(mean, float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n), n)
