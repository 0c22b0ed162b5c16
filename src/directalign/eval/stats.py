"""Per-metric statistics of an evaluation: the mean, the sample std and the two-sided 95% Student-t interval."""

from __future__ import annotations

import math

_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, Cornish-Fisher beyond)."""
    if df < 1:
        return float("nan")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959963985
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values) -> dict:
    """Mean, sample std, n and the two-sided 95% t-interval of the mean (None where undefined)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci95_low": None, "ci95_high": None}
    m = sum(v) / n
    if n == 1:
        return {"mean": m, "std": None, "n": 1, "ci95_low": None, "ci95_high": None}
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    h = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "std": sd, "n": n, "ci95_low": m - h, "ci95_high": m + h}
