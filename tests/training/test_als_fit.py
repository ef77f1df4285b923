from __future__ import annotations

import numpy as np

from recsvc.config import DAY, CollaborativeConfig
from training.als_fit import confidence_matrix, fit_cf

CUTOFF = 50 * DAY


def _events(seed: int = 0, n: int = 600) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 40, n)  # items 40..49 of a 50-item catalogue never occur
    users = rng.integers(0, 60, n)
    ts = np.sort(rng.integers(CUTOFF - 20 * DAY, CUTOFF, n))
    weights = rng.choice(np.array([1.0, 2.0, 8.0], np.float32), n)
    return items, users, ts, weights


def test_confidence_matrix_sums_decayed_weights_before_the_cutoff_only() -> None:
    items = np.array([1, 1, 2, 1])
    users = np.array([0, 0, 1, 0])
    ts = np.array([CUTOFF - 2 * DAY, CUTOFF - 1, CUTOFF - DAY, CUTOFF])
    weights = np.array([4.0, 1.0, 2.0, 100.0], np.float32)
    m = confidence_matrix(items, users, ts, weights, 3, CUTOFF, half_life_days=1.0).toarray()
    np.testing.assert_allclose(m[0], [0.0, 4.0 * 0.25 + 1.0, 0.0], rtol=1e-4)
    np.testing.assert_allclose(m[1], [0.0, 0.0, 1.0])


def test_items_without_events_get_zero_factors_and_the_rest_do_not() -> None:
    items, users, ts, weights = _events()
    model = fit_cf(items, users, ts, weights, 50, CUTOFF, CollaborativeConfig(factors=8, iterations=5))
    assert model.item_factors.shape == (50, 8)
    assert not model.item_factors[40:].any()
    assert set(model.active.tolist()) == set(np.unique(items).tolist())


def test_events_at_or_after_the_cutoff_do_not_change_the_factors() -> None:
    items, users, ts, weights = _events(1)
    cfg = CollaborativeConfig(factors=8, iterations=5, threads=1)
    base = fit_cf(items, users, ts, weights, 50, CUTOFF, cfg)
    later = np.full(50, CUTOFF + DAY)
    extended = fit_cf(
        np.concatenate([items, np.arange(50)]),
        np.concatenate([users, np.zeros(50, np.int64)]),
        np.concatenate([ts, later]),
        np.concatenate([weights, np.ones(50, np.float32)]),
        50,
        CUTOFF,
        cfg,
    )
    np.testing.assert_allclose(extended.item_factors, base.item_factors, rtol=1e-5, atol=1e-6)


def test_folded_in_users_score_their_own_items_above_others_on_average() -> None:
    items, users, ts, weights = _events(2, 2000)
    model = fit_cf(items, users, ts, weights, 50, CUTOFF, CollaborativeConfig(factors=8, iterations=10))
    from recsvc.history import UserHistory

    own, other = [], []
    for u in range(60):
        mine = users == u
        h = UserHistory(items[mine].astype(np.int32), ts[mine].astype(np.int64), weights[mine])
        factor = model.user_factor(h, CUTOFF)
        assert factor is not None
        scores = model.scores(factor, np.arange(40))
        seen = np.isin(np.arange(40), items[mine])
        own.append(scores[seen].mean())
        other.append(scores[~seen].mean())
    assert np.mean(own) > np.mean(other)
