"""Statistics over seeds: mean and spread, and paired differences with 95%
confidence intervals (Student's t, since a handful of seeds is the norm).

Runs with the same seed share their initialisation of the shared weights and (in
experiments) the data order, so variant differences are paired by seed: the
seed-to-seed variation common to both variants cancels."""

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    n: int

    def format(self, digits: int = 4) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean of (a - b) over seeds present in both
    low: float  # 95% confidence interval
    high: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes zero (needs at least two pairs)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 4) -> str:
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (1 seed, no interval)"
        mark = " *" if self.significant else ""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{mark}"


def summarize_values(values) -> Summary:
    values = np.asarray(list(values), dtype=float)
    if values.size == 0:
        raise ValueError("no values to summarize")
    return Summary(float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0, int(values.size))


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> PairedDifference:
    """a, b: {seed: value}. The t interval of the mean of a[s] - b[s] over shared seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    mean = float(d.mean())
    if d.size < 2:
        return PairedDifference(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return PairedDifference(mean, mean - half, mean + half, int(d.size))
