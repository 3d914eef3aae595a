"""The statistics behind every comparison the harness prints: intervals, paired tests, ranks.

All tests come from scipy (t and studentized-range distributions, Wilcoxon signed-rank, binomial
sign test, Friedman); nothing here re-derives a distribution by hand. Accuracies are in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
ALPHA = 1 - LEVEL
Z95 = float(stats.norm.ppf(0.975))
MIN_WILCOXON = 6  # with fewer non-zero differences no two-sided Wilcoxon p-value reaches 0.05


def t_interval(values) -> tuple[float, float]:
    """95 % Student-t interval of the mean of >= 2 values (seeds); (nan, nan) for fewer."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    mean, sem = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
    if sem == 0:
        return float(mean), float(mean)
    lo, hi = stats.t.interval(LEVEL, len(x) - 1, loc=mean, scale=sem)
    return float(lo), float(hi)


def wilson_interval(top1: float, n_test: int) -> tuple[float, float]:
    """95 % Wilson interval of one run's test accuracy (its test-set sampling error only)."""
    if not n_test:
        return math.nan, math.nan
    k = round(top1 / 100 * n_test)
    ci = stats.binomtest(k, n_test).proportion_ci(LEVEL, method="wilson")
    return 100 * ci.low, 100 * ci.high


def interval(values, n_test: int | None = None) -> tuple[float, float]:
    """The interval the report shows, inside [0, 100]: over seeds when there are >= 2, never narrower
    than the test set's own sampling error (the Wilson interval of the mean accuracy: three identical
    seeds are not certainty), else Wilson for one run (runs without a number, e.g. a headline that
    does not apply, are left out)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) >= 2:
        lo, hi = t_interval(values)
        if n_test:
            w_lo, w_hi = wilson_interval(float(np.mean(values)), int(n_test))
            lo, hi = min(lo, w_lo), max(hi, w_hi)
        return clip_percent(lo, hi)
    if len(values) == 1 and n_test:
        return wilson_interval(values[0], int(n_test))
    return math.nan, math.nan


def clip_percent(lo: float, hi: float) -> tuple[float, float]:
    """An accuracy interval cut to the [0, 100] an accuracy can take."""
    return max(0.0, lo), min(100.0, hi)


@dataclass
class Paired:
    """B minus A over paired cells: mean difference, its interval, wins/ties/losses and a p-value."""

    n: int
    mean: float
    lo: float
    hi: float
    wins: int  # cells where B is ahead
    ties: int
    losses: int
    test: str  # "wilcoxon" | "sign" | "none"
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def paired(a, b, tie: float = 1e-9) -> Paired:
    """Paired comparison of matched cells a[i], b[i]: Wilcoxon signed-rank where there are at
    least MIN_WILCOXON non-zero differences, else the exact sign test (binomial)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(d) == 0:
        return Paired(0, math.nan, math.nan, math.nan, 0, 0, 0, "none", math.nan)
    wins, losses = int((d > tie).sum()), int((d < -tie).sum())
    ties = len(d) - wins - losses
    lo, hi = t_interval(d) if len(d) >= 2 else (math.nan, math.nan)
    nonzero = wins + losses
    if nonzero == 0:
        test, p = "sign", 1.0
    elif nonzero >= MIN_WILCOXON:
        test, p = "wilcoxon", float(stats.wilcoxon(d[np.abs(d) > tie]).pvalue)
    else:
        test, p = "sign", float(stats.binomtest(wins, nonzero).pvalue)
    return Paired(len(d), float(d.mean()), lo, hi, wins, ties, losses, test, p)


@dataclass
class Ranks:
    """Average ranks of k methods over N blocks (datasets), Friedman's test and Nemenyi's critical
    difference (Demsar 2006): two methods differ when their average ranks differ by more than `cd`."""

    methods: list[str]
    avg_rank: list[float]
    n_blocks: int
    friedman_p: float
    cd: float


def ranks(methods: list[str], scores: np.ndarray) -> Ranks:
    """scores [N blocks, k methods], higher is better; rank 1 is best, ties share the average rank."""
    scores = np.asarray(scores, dtype=float)
    n, k = scores.shape
    r = np.vstack([stats.rankdata(-row) for row in scores])
    p = float(stats.friedmanchisquare(*scores.T).pvalue) if k >= 3 and n >= 2 else math.nan
    q = stats.studentized_range.ppf(LEVEL, k, np.inf) / math.sqrt(2) if k >= 2 else math.nan
    cd = float(q * math.sqrt(k * (k + 1) / (6 * n))) if k >= 2 else math.nan
    return Ranks(list(methods), [float(v) for v in r.mean(0)], n, p, cd)
