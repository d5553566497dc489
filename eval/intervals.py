"""95 % intervals for the numbers vlmeff plots: POPE metrics (bootstrap over questions), proportions such as CHAIR_S
(Wilson score interval) and paired speedups over timed runs (t-interval on log ratios).

Every interval says what it resamples; plots and tables name the method next to the number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

LEVEL = 0.95
Z95 = 1.959963984540054
# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal quantile)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def bootstrap_interval(groups: Mapping[str, Sequence], statistic: Callable[[dict[str, list]], float], *,
                       resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (95 %) of `statistic` when every group (a POPE split) is resampled with
    replacement on its own, keeping its size: the mean over splits is then resampled as POPE reports it.

    groups: {name: items}; statistic({name: resampled items}) -> float. Seeded: the same inputs give the same
    interval.
    """
    rng = np.random.default_rng(seed)
    names = list(groups)
    sizes = [len(groups[g]) for g in names]
    if not names or min(sizes) == 0:
        return float("nan"), float("nan")
    draws = {g: rng.integers(0, n, size=(resamples, n)) for g, n in zip(names, sizes)}  # one matrix per group
    values = np.array([statistic({g: [groups[g][i] for i in draws[g][r]] for g in names}) for r in range(resamples)])
    low, high = np.quantile(values, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(low), float(high)


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (stays inside [0, 1], sensible at 0 or n successes)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else Z95


def ratio_interval(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): 95 % t-interval of paired per-run ratios (e.g. vanilla prefill / strategy
    prefill of the same run), computed on their logarithms. Fewer than 2 runs: the interval is NaN."""
    logs = np.log(np.asarray([r for r in ratios if r > 0 and math.isfinite(r)], dtype=float))
    if logs.size == 0:
        return float("nan"), float("nan"), float("nan")
    centre = float(np.exp(logs.mean()))
    if logs.size < 2:
        return centre, float("nan"), float("nan")
    half = t_quantile(logs.size - 1) * logs.std(ddof=1) / math.sqrt(logs.size)
    return centre, float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))
