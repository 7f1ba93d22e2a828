"""Confidence intervals for accuracy differences.

Two models evaluated on the same test images give paired per-image outcomes (1 = the
attack failed, the image stayed correct). The difference of their accuracies is the mean
of the per-image differences, and its interval is the paired t-interval
(``scipy.stats.ttest_rel``), which on 2,000 images is indistinguishable from the normal
interval of McNemar-style paired proportions.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def paired_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict:
    """Accuracy of ``a`` minus that of ``b`` on the same images, with its paired t-interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired outcomes need two equal 1-D arrays of >= 2 images, got {a.shape} and {b.shape}")
    diff = float(np.mean(a - b))
    if np.all(a - b == (a - b)[0]):          # no variation: the interval is the point
        return {"diff": diff, "low": diff, "high": diff, "n": len(a)}
    interval = stats.ttest_rel(a, b).confidence_interval(confidence)
    return {"diff": diff, "low": float(interval.low), "high": float(interval.high), "n": len(a)}


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation across seeds (sd is nan for one value)."""
    values = [float(v) for v in values]
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}
