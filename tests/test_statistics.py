import numpy as np
import pytest
from scipy import stats

from mrpf.statistics import paired_difference, seed_image_difference, spread


def test_paired_difference_matches_the_t_interval_by_hand():
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.33
    b = a.copy()
    flip = rng.random(2000) < 0.1
    b[flip] = ~b[flip]
    d = paired_difference(a, b)
    diffs = a.astype(float) - b.astype(float)
    half = 1.9612 * diffs.std(ddof=1) / np.sqrt(len(diffs))   # t quantile at 1999 dof
    assert d["diff"] == pytest.approx(diffs.mean())
    assert d["low"] == pytest.approx(diffs.mean() - half, abs=1e-4)
    assert d["high"] == pytest.approx(diffs.mean() + half, abs=1e-4)


def test_identical_outcomes_give_a_zero_width_interval_and_bad_shapes_are_refused():
    a = np.array([1, 0, 1, 1], dtype=bool)
    assert paired_difference(a, a) == {"diff": 0.0, "low": 0.0, "high": 0.0, "n": 4}
    with pytest.raises(ValueError):
        paired_difference(a, a[:3])


def test_spread_across_seeds():
    s = spread([0.30, 0.31, 0.32])
    assert s["mean"] == pytest.approx(0.31) and s["sd"] == pytest.approx(0.01) and s["n"] == 3


def test_one_seed_gives_the_paired_interval_over_images():
    rng = np.random.default_rng(1)
    a, b = rng.random((1, 500)) < 0.4, rng.random((1, 500)) < 0.35
    crossed = seed_image_difference(a, b)
    paired = paired_difference(a[0], b[0])
    assert crossed["diff"] == pytest.approx(paired["diff"])
    assert (crossed["low"], crossed["high"]) == pytest.approx((paired["low"], paired["high"]), abs=1e-9)


def test_outcomes_constant_over_images_give_the_t_interval_over_seeds():
    per_seed = np.array([0.002, -0.004, 0.0035])
    a = np.repeat(per_seed[:, None], 300, axis=1)
    d = seed_image_difference(a, np.zeros_like(a))
    low, high = stats.t.interval(0.95, 2, loc=per_seed.mean(), scale=per_seed.std(ddof=1) / np.sqrt(3))
    assert d["diff"] == pytest.approx(per_seed.mean())
    assert (d["low"], d["high"]) == pytest.approx((low, high), rel=1e-9)
    assert d["df"] == pytest.approx(2)


def test_seed_image_interval_covers_the_true_difference_where_pooling_does_not():
    """Synthetic crossed data d_si = mu + A_s + B_i + E_si with a known mu: the interval holds mu
    in about 95 % of replications; treating the 3 x N outcomes as independent does not."""
    rng = np.random.default_rng(7)
    mu, seeds, images, reps = 0.01, 3, 400, 400
    covered = pooled_covered = 0
    for _ in range(reps):
        d = (mu + rng.normal(0, 0.02, (seeds, 1)) + rng.normal(0, 0.3, (1, images))
             + rng.normal(0, 0.3, (seeds, images)))
        interval = seed_image_difference(d, np.zeros_like(d))
        covered += interval["low"] <= mu <= interval["high"]
        pooled = paired_difference(d.ravel(), np.zeros(d.size))
        pooled_covered += pooled["low"] <= mu <= pooled["high"]
    assert 0.92 <= covered / reps <= 0.985, covered / reps
    assert pooled_covered / reps < 0.85, pooled_covered / reps


def test_seed_image_difference_refuses_bad_shapes():
    with pytest.raises(ValueError):
        seed_image_difference(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError):
        seed_image_difference(np.zeros(5), np.zeros(5))
