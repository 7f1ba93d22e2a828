"""Confidence intervals for accuracy differences.

Two models evaluated on the same test images give paired per-image outcomes (1 = the
attack failed, the image stayed correct). The difference of their accuracies is the mean
of the per-image differences, and its interval is the paired t-interval
(``scipy.stats.ttest_rel``), which on 2,000 images is indistinguishable from the normal
interval of McNemar-style paired proportions.

Several fine-tuning seeds on the same test images form a crossed seeds x images design:
``seed_image_difference`` gives the interval for the mean difference over both, from the
two-way random-effects ANOVA (seed, image and residual mean squares) with a
Satterthwaite t (docs/method.md, "Statistics"). Concatenating the seeds' outcomes as if
they were independent images ignores both the seed-to-seed variance and that the same
images repeat, and gives too narrow an interval.
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


def seed_image_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict:
    """Mean difference of ``a`` and ``b`` (outcomes of shape (seeds, images), the same images
    under every seed) with a 95 % interval over new seeds *and* new test images.

    Model: d_si = mu + A_s + B_i + E_si (seed, image, residual effects). With the ANOVA mean
    squares MS_seed = N var(seed means), MS_image = S var(image means), MS_res,
    Var(mean) = (MS_seed + max(0, MS_image - MS_res)) / (S N), with Satterthwaite's degrees
    of freedom. One seed gives the paired t-interval over images; outcomes constant over
    images give the t-interval over the per-seed differences.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"seed x image outcomes need two equal (seeds, images) arrays with >= 2 images, "
                         f"got {a.shape} and {b.shape}")
    d = a - b
    seeds, images = d.shape
    mean = float(d.mean())
    out = {"diff": mean, "seeds": seeds, "n": images}
    image_ms = seeds * float(np.var(d.mean(0), ddof=1))
    if seeds == 1:
        terms = [(image_ms / images, images - 1)]
    else:
        seed_ms = images * float(np.var(d.mean(1), ddof=1))
        residual = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + mean
        residual_ms = float((residual ** 2).sum()) / ((seeds - 1) * (images - 1))
        scale = seeds * images
        terms = [(seed_ms / scale, seeds - 1)]
        if image_ms > residual_ms:
            terms += [(image_ms / scale, images - 1), (-residual_ms / scale, (seeds - 1) * (images - 1))]
    variance = sum(v for v, _ in terms)
    if variance <= 0:                      # no variation at all: the interval is the point
        return dict(out, low=mean, high=mean, df=math.inf)
    df = variance ** 2 / sum(v ** 2 / k for v, k in terms)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(variance)
    return dict(out, low=mean - half, high=mean + half, df=df)
