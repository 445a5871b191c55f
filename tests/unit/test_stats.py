"""Means with Student-t intervals and paired differences, against hand-computed values."""

import math

import pytest

from bird_core.stats import mean_interval, paired_difference, t_quantile_975


def test_t_quantiles_match_tables():
    # Printed tables of t_{0.975}: df 1 → 12.706, 4 → 2.776, 30 → 2.042, ∞ → 1.960.
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    assert t_quantile_975(10**6) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_t_quantiles_agree_with_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 40), 45, 50, 75, 100, 200, 1000):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df


def test_paired_difference_by_hand():
    # a − b = 1, 2, 3, 4, 5: mean 3, sample sd √2.5 = 1.5811, se = 0.7071,
    # t_{0.975, 4} = 2.7764 → half-width 1.9632, interval [1.0368, 4.9632].
    a = [11.0, 12.0, 13.0, 14.0, 15.0]
    b = [10.0, 10.0, 10.0, 10.0, 10.0]
    diff = paired_difference(a, b)
    assert diff.n == 5
    assert diff.mean == pytest.approx(3.0)
    assert diff.std == pytest.approx(math.sqrt(2.5))
    assert diff.half_width == pytest.approx(1.9632, abs=1e-4)
    assert (diff.low, diff.high) == (
        pytest.approx(1.0368, abs=1e-4),
        pytest.approx(4.9632, abs=1e-4),
    )
    assert diff.excludes_zero()
    as_dict = diff.as_dict()
    assert as_dict["low"] == pytest.approx(diff.low) and as_dict["n"] == 5


def test_pairing_cancels_the_shared_seed_effect():
    # Both variants swing with the seed by the same amounts; only the pairing sees the gap.
    seed_effect = [0.0, 8.0, -6.0, 3.0, -5.0]
    a = [20.0 + e for e in seed_effect]
    b = [21.0 + e + d for e, d in zip(seed_effect, [0.1, -0.1, 0.2, -0.2, 0.0], strict=True)]
    unpaired_a, unpaired_b = mean_interval(a), mean_interval(b)
    assert unpaired_a.high > unpaired_b.low  # the two intervals overlap
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(-1.0)
    assert diff.excludes_zero()


def test_interval_including_zero_is_not_a_difference():
    diff = paired_difference([1.0, -1.0, 2.0], [0.0, 0.0, 0.0])
    assert diff.low < 0 < diff.high
    assert not diff.excludes_zero()


def test_single_value_has_no_interval_and_bad_input_is_refused():
    one = mean_interval([4.0])
    assert one.mean == 4.0 and math.isnan(one.half_width) and not one.excludes_zero()
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])
