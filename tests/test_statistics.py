import numpy as np
import pytest

from mrpf.statistics import paired_difference, spread


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
