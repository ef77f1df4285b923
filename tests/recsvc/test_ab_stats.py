from __future__ import annotations

import math

import numpy as np
import pytest

from recsvc import ab_stats


def test_wilson_interval_matches_hand_computed_half_of_hundred() -> None:
    lo, hi = ab_stats.wilson_interval(50, 100)
    # p=0.5, z=1.95996: centre 0.5, half = z*sqrt(0.0025 + z^2/40000)/(1 + z^2/100)
    z = 1.959963984540054
    half = z * math.sqrt(0.0025 + z * z / 40000) / (1 + z * z / 100)
    assert lo == pytest.approx(0.5 - half, abs=1e-12)
    assert hi == pytest.approx(0.5 + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)


def test_wilson_interval_stays_inside_unit_range_for_zero_successes() -> None:
    lo, hi = ab_stats.wilson_interval(0, 20)
    assert lo == 0.0
    z2 = 1.959963984540054**2
    assert hi == pytest.approx((z2 / 20) / (1 + z2 / 20), rel=1e-9)  # closed form when p = 0


def test_wilson_interval_rejects_more_successes_than_trials() -> None:
    with pytest.raises(ValueError, match="successes"):
        ab_stats.wilson_interval(5, 3)


def test_proportion_rate_is_successes_over_n() -> None:
    p = ab_stats.proportion(3, 12)
    assert p.rate == 0.25
    assert p.ci_low < 0.25 < p.ci_high


def test_two_proportion_ztest_matches_hand_computation() -> None:
    res = ab_stats.two_proportion_ztest(50, 100, 60, 100)
    se0 = math.sqrt(0.55 * 0.45 * (2 / 100))
    assert res.diff == pytest.approx(0.1)
    assert res.z == pytest.approx(0.1 / se0)
    assert res.p_value == pytest.approx(0.15521, abs=1e-4)
    se = math.sqrt(0.5 * 0.5 / 100 + 0.6 * 0.4 / 100)
    assert res.ci_low == pytest.approx(0.1 - 1.959963984540054 * se)
    assert res.relative_lift == pytest.approx(0.2)


def test_two_proportion_ztest_equal_rates_give_p_value_one() -> None:
    res = ab_stats.two_proportion_ztest(0, 10, 0, 10)
    assert res.p_value == 1.0
    assert math.isnan(res.relative_lift)


def test_welch_ttest_matches_hand_computation() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([2.0, 4.0, 6.0, 8.0])
    res = ab_stats.welch_ttest(a, b)
    # var(a)/4 = 5/12, var(b)/4 = 5/3 -> se^2 = 25/12, diff = 2.5 -> t = sqrt(3)
    assert res.diff == pytest.approx(2.5)
    assert res.t == pytest.approx(math.sqrt(3))
    df = (25 / 12) ** 2 / ((5 / 12) ** 2 / 3 + (5 / 3) ** 2 / 3)
    assert res.df == pytest.approx(df)
    assert res.ci_low < 0 < res.ci_high  # not significant with 4 values each
    assert res.p_value > 0.05


def test_welch_ttest_rejects_groups_too_small() -> None:
    with pytest.raises(ValueError, match=">= 2 values"):
        ab_stats.welch_ttest(np.array([1.0]), np.array([1.0, 2.0]))


def test_mean_interval_of_constant_values_has_zero_width() -> None:
    mean, lo, hi = ab_stats.mean_interval(np.array([2.0, 2.0, 2.0]))
    assert (mean, lo, hi) == (2.0, 2.0, 2.0)


def test_sign_test_eight_of_ten_is_exact_binomial() -> None:
    res = ab_stats.sign_test(8, 2)
    assert res.p_value == pytest.approx(2 * (45 + 10 + 1) / 1024)
    assert res.preference == pytest.approx(0.3)


def test_preference_score_counts_ties_as_half_wins() -> None:
    assert ab_stats.preference_score(8, 2, 10) == pytest.approx(13 / 20 - 0.5)
    assert ab_stats.preference_score(0, 0, 0) == 0.0


def test_sign_test_without_decisive_impressions_is_not_significant() -> None:
    assert ab_stats.sign_test(0, 0, 5).p_value == 1.0
