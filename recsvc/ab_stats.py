"""Pure statistics for A/B reports: rates with confidence intervals and significance tests.

Kept free of I/O and data frames so every number in a report can be checked by hand: each
function takes counts or plain arrays and returns a small frozen result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


@dataclass(frozen=True)
class Proportion:
    """A rate such as CTR: `successes / n` with a Wilson score interval."""

    successes: int
    n: int
    rate: float
    ci_low: float
    ci_high: float


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval: unlike the normal one it stays inside [0, 1] for rare clicks."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(successes: int, n: int, confidence: float = 0.95) -> Proportion:
    """Rate plus its Wilson interval (rate is 0 when there is no data)."""
    lo, hi = wilson_interval(successes, n, confidence)
    return Proportion(successes, n, successes / n if n else 0.0, lo, hi)


@dataclass(frozen=True)
class ProportionTest:
    """Treatment minus control for two rates: pooled z-test, unpooled interval on the difference."""

    diff: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    relative_lift: float  # diff / control rate; nan when control rate is 0


def two_proportion_ztest(
    successes_control: int,
    n_control: int,
    successes_treatment: int,
    n_treatment: int,
    confidence: float = 0.95,
) -> ProportionTest:
    """Two-sided two-proportion z-test (pooled standard error under H0: equal rates)."""
    if n_control <= 0 or n_treatment <= 0:
        raise ValueError(f"both groups need exposures, got n_control={n_control}, n_treatment={n_treatment}")
    p1 = successes_control / n_control
    p2 = successes_treatment / n_treatment
    diff = p2 - p1
    pooled = (successes_control + successes_treatment) / (n_control + n_treatment)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_control + 1 / n_treatment))
    if se0 == 0.0:
        z, p_value = 0.0, 1.0
    else:
        z = diff / se0
        p_value = float(2.0 * stats.norm.sf(abs(z)))
    se = math.sqrt(p1 * (1 - p1) / n_control + p2 * (1 - p2) / n_treatment)
    half = _z(confidence) * se
    lift = diff / p1 if p1 > 0 else float("nan")
    return ProportionTest(diff, z, p_value, diff - half, diff + half, lift)


@dataclass(frozen=True)
class MeanTest:
    """Treatment minus control for a per-exposure metric such as revenue (Welch t-test)."""

    mean_control: float
    mean_treatment: float
    diff: float
    t: float
    df: float
    p_value: float
    ci_low: float
    ci_high: float


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean with a Student-t interval: (mean, low, high); degenerate for < 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (0.0, float("nan"), float("nan"))
    mean = float(x.mean())
    if x.size < 2:
        return (mean, float("nan"), float("nan"))
    se = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, x.size - 1)) * se
    return (mean, mean - half, mean + half)


def welch_ttest(control: np.ndarray, treatment: np.ndarray, confidence: float = 0.95) -> MeanTest:
    """Welch's unequal-variance t-test; revenue per exposure is heavy-tailed and rarely equal-variance."""
    a = np.asarray(control, dtype=np.float64)
    b = np.asarray(treatment, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"Welch test needs >= 2 values per group, got {a.size} and {b.size}")
    va = float(a.var(ddof=1)) / a.size
    vb = float(b.var(ddof=1)) / b.size
    diff = float(b.mean() - a.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:
        return MeanTest(float(a.mean()), float(b.mean()), diff, 0.0, float("inf"), 1.0, diff, diff)
    t = diff / se
    df = (va + vb) ** 2 / (va * va / (a.size - 1) + vb * vb / (b.size - 1))
    p_value = float(2.0 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df)) * se
    return MeanTest(float(a.mean()), float(b.mean()), diff, t, df, p_value, diff - half, diff + half)


@dataclass(frozen=True)
class PreferenceTest:
    """Interleaving outcome: who the clicks preferred, and whether that is more than chance."""

    wins_a: int
    wins_b: int
    ties: int
    preference: float  # Δ_AB = (wins_a + ties/2) / total - 1/2, in [-0.5, 0.5]; > 0 favours A
    p_value: float  # two-sided exact sign test on wins (ties carry no information)


def preference_score(wins_a: int, wins_b: int, ties: int) -> float:
    """Chapelle et al. (2012) Δ_AB: 0 means no preference; 0 when no impression had a click."""
    total = wins_a + wins_b + ties
    if total == 0:
        return 0.0
    return (wins_a + 0.5 * ties) / total - 0.5


def sign_test(wins_a: int, wins_b: int, ties: int = 0) -> PreferenceTest:
    """Exact binomial sign test of wins_a vs wins_b with p = 1/2 under H0."""
    if min(wins_a, wins_b, ties) < 0:
        raise ValueError(f"counts must be >= 0, got wins_a={wins_a}, wins_b={wins_b}, ties={ties}")
    decisive = wins_a + wins_b
    p_value = 1.0 if decisive == 0 else float(stats.binomtest(wins_a, decisive, 0.5).pvalue)
    return PreferenceTest(wins_a, wins_b, ties, preference_score(wins_a, wins_b, ties), p_value)
