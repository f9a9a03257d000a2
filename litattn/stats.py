"""Paired confidence intervals over seeds: how ablation tables say whether a difference is more than noise.

A variant and its baseline run with the same seeds, so each seed gives one difference; the interval is
Student's t over those differences (df = seeds - 1), the standard small-sample interval for a paired mean.
"""

from __future__ import annotations

import math
import statistics

# Two-sided 95% quantiles of Student's t, t(0.975, df), for df = 1..30 (df > 30: the normal's 1.96 is within 4%).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the half-width of a 95% interval in standard errors."""
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1 (two or more paired values), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def paired_ci(differences: list[float]) -> tuple[float, float]:
    """(mean, half-width) of the 95% Student-t interval of the mean of paired differences; half-width NaN with
    fewer than two differences (one seed says nothing about the spread)."""
    if not differences:
        raise ValueError("paired_ci needs at least one difference")
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan
    half = t_quantile_975(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, half


def format_ci(mean: float, half: float, fmt: str = ".3f") -> str:
    """`+0.120 [+0.050, +0.190] *`: the mean difference, its 95% interval, and `*` when the interval excludes 0."""
    if math.isnan(half):
        return f"{mean:+{fmt}} (one seed)"
    low, high = mean - half, mean + half
    mark = " *" if low > 0 or high < 0 else ""
    return f"{mean:+{fmt}} [{low:+{fmt}}, {high:+{fmt}}]{mark}"
