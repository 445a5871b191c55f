"""Small-sample statistics for experiments over seeds: means with Student-t 95% intervals, and
paired differences (two variants run with the same seeds, compared seed by seed).

Pairing matters: with the same seed two variants start from the same student, see the same
batches and the same meta batches, so most of the seed-to-seed spread cancels in their
difference. The interval of the mean paired difference is what says whether one variant beats
the other.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

# Two-sided 95% quantiles of Student's t (t_{0.975, df}) for df = 1..30.
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table up to 30 degrees of freedom, a Cornish-Fisher expansion above
    (error below 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% confidence interval over ``n`` values (Student t, n − 1 df)."""

    mean: float
    std: float
    half_width: float  # of the 95% interval; NaN with a single value
    n: int

    @property
    def low(self) -> float:
        """Lower end of the interval."""
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        """Upper end of the interval."""
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether 0 lies outside the interval (False when it is undefined)."""
        return not math.isnan(self.half_width) and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float]:
        """JSON-able form, with the interval's ends."""
        return {**asdict(self), "low": self.low, "high": self.high}


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean, sample standard deviation and 95% interval of the mean of ``values``."""
    clean = [float(v) for v in values]
    if not clean:
        raise ValueError("no values to summarise")
    if any(math.isnan(v) for v in clean):
        raise ValueError(f"values contain NaN: {clean}")
    n = len(clean)
    mean = statistics.fmean(clean)
    if n == 1:
        return Interval(mean, 0.0, math.nan, 1)
    std = statistics.stdev(clean)
    return Interval(mean, std, t_quantile_975(n - 1) * std / math.sqrt(n), n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean of a_i − b_i over pairs i (the same seed) with its 95% interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)])
