from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsvc.behaviour import (
    USER_FEATURE_NAMES,
    CoOccurrence,
    ItemStats,
    decay,
    user_behaviour,
)
from recsvc.config import DAY
from recsvc.history import UserHistory

NOW = 100 * DAY


def _events() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # item, user, ts, weight
    rows = [
        (0, 0, NOW - 2 * 3600, 1.0),  # within 1d
        (0, 0, NOW - 3 * DAY, 2.0),  # within 7d, same user again -> repeat
        (0, 1, NOW - 20 * DAY, 4.0),  # within 30d
        (1, 1, NOW - 60 * DAY, 8.0),  # only in "all"
        (2, 2, NOW + 10, 100.0),  # future: must be ignored
    ]
    item, user, ts, w = zip(*rows)
    return np.array(item), np.array(user), np.array(ts), np.array(w, np.float32)


def test_item_stats_windows_count_weights_by_age() -> None:
    stats = ItemStats.from_interactions(*_events(), n_items=3, now=NOW)
    assert stats.counts[0].tolist() == [1.0, 3.0, 7.0, 7.0]
    assert stats.counts[1].tolist() == [0.0, 0.0, 0.0, 8.0]


def test_item_stats_ignore_events_at_or_after_now() -> None:
    stats = ItemStats.from_interactions(*_events(), n_items=3, now=NOW)
    assert stats.counts[2].sum() == 0 and stats.users[2] == 0
    assert np.isnan(stats.first_ts[2]) and np.isnan(stats.last_ts[2])


def test_item_stats_users_repeat_users_and_first_last_seen() -> None:
    stats = ItemStats.from_interactions(*_events(), n_items=3, now=NOW)
    assert stats.users[0] == 2 and stats.repeat_users[0] == 1
    assert stats.first_ts[0] == NOW - 20 * DAY and stats.last_ts[0] == NOW - 2 * 3600


def test_update_adds_weight_users_and_moves_last_seen() -> None:
    stats = ItemStats.from_interactions(*_events(), n_items=3, now=NOW)
    stats.update(2, NOW + 5, 4.0, user_prior_count=0)
    stats.update(2, NOW + 6, 1.0, user_prior_count=1)
    assert stats.counts[2].tolist() == [5.0, 5.0, 5.0, 5.0]
    assert stats.users[2] == 1 and stats.repeat_users[2] == 1
    assert stats.first_ts[2] == NOW + 5 and stats.last_ts[2] == NOW + 6
    assert stats.top_popular(1).tolist() == [2]


def test_top_popular_orders_by_recent_weight_and_skips_unseen() -> None:
    stats = ItemStats.from_interactions(*_events(), n_items=3, now=NOW)
    assert stats.top_popular(10).tolist() == [0]  # item 1 is outside the 7-day window, 2 unseen


def test_item_stats_save_load_round_trip(tmp_path: Path) -> None:
    stats = ItemStats.from_interactions(*_events(), n_items=3, now=NOW)
    stats.save(tmp_path / "s.npz")
    back = ItemStats.load(tmp_path / "s.npz")
    assert back.now == stats.now
    np.testing.assert_array_equal(back.counts, stats.counts)
    np.testing.assert_array_equal(back.first_ts, stats.first_ts)


def test_decay_halves_after_one_half_life() -> None:
    assert decay(np.array([0, 7 * DAY]), 7.0).tolist() == pytest.approx([1.0, 0.5])


def _cooc_events() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # users 0..3 buy items 0 and 1 together; user 4 buys 0 then 2 far apart in time; item 3 alone
    item, user, ts = [], [], []
    for u in range(4):
        item += [0, 1]
        user += [u, u]
        ts += [NOW - DAY - 10, NOW - DAY]
    item += [0, 2, 3]
    user += [4, 4, 5]
    ts += [NOW - 40 * DAY, NOW - 2 * DAY, NOW - DAY]
    return np.array(item), np.array(user), np.array(ts), np.ones(len(item), np.float32)


def test_cooccurrence_links_items_bought_together_and_not_far_apart() -> None:
    cooc = CoOccurrence.from_interactions(*_cooc_events(), n_items=4, now=NOW)
    nbrs, scores = cooc.neighbours(0)
    assert nbrs.tolist() == [1]
    assert 0 < scores[0] <= 1.0 + 1e-6
    assert cooc.neighbours(3)[0].tolist() == []


def test_cooccurrence_is_symmetric_and_keeps_top_k() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    item = rng.integers(0, 50, n)
    user = rng.integers(0, 100, n)
    ts = np.sort(rng.integers(NOW - 5 * DAY, NOW, n))
    cooc = CoOccurrence.from_interactions(item, user, ts, np.ones(n, np.float32), 50, NOW, neighbours=5)
    assert (np.diff(cooc.indptr) <= 5).all()
    nbrs, scores = cooc.neighbours(7)
    assert (np.diff(scores) <= 0).all()
    full = CoOccurrence.from_interactions(item, user, ts, np.ones(n, np.float32), 50, NOW, neighbours=50)
    a, sa = full.neighbours(int(nbrs[0]))
    assert 7 in a.tolist()
    assert sa[a.tolist().index(7)] == pytest.approx(scores[0])


def test_cooccurrence_save_load_round_trip(tmp_path: Path) -> None:
    cooc = CoOccurrence.from_interactions(*_cooc_events(), n_items=4, now=NOW)
    cooc.save(tmp_path / "c.npz")
    back = CoOccurrence.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.indices, cooc.indices)
    np.testing.assert_array_equal(back.scores, cooc.scores)


def test_user_behaviour_measures_activity_recency_and_diversity() -> None:
    h = UserHistory(
        np.array([0, 1, 1, 2], np.int32),
        np.array([NOW - 10 * DAY, NOW - 3 * DAY, NOW - 2 * DAY, NOW - DAY], np.int64),
        np.array([1, 2, 2, 4], np.float32),
    )
    codes = np.array([0, 0, 1], np.int32)
    f = dict(zip(USER_FEATURE_NAMES, user_behaviour(h, NOW, codes)))
    assert f["n_events"] == 4 and f["weight_sum"] == 9 and f["events_7d"] == 3
    assert f["days_since_last"] == pytest.approx(1.0)
    assert f["distinct_item_share"] == pytest.approx(3 / 4)
    assert f["attribute_diversity"] == pytest.approx(2 / 4)


def test_user_behaviour_of_empty_history_is_zero_activity_and_nan_recency() -> None:
    f = dict(zip(USER_FEATURE_NAMES, user_behaviour(UserHistory.empty(), NOW)))
    assert f["n_events"] == 0 and np.isnan(f["days_since_last"])


def _count_rows(stats: ItemStats, rows: np.ndarray) -> np.ndarray:
    return stats.counts[rows, 3:4] * 2


def test_derived_table_is_built_once_and_follows_updates() -> None:
    stats = ItemStats.from_interactions(*_events(), n_items=3, now=NOW)
    table = stats.derived_table(_count_rows)
    assert stats.derived_table(_count_rows) is table  # cached
    stats.update(1, NOW + 5, 3.0, user_prior_count=0)
    np.testing.assert_array_equal(stats.derived_table(_count_rows), _count_rows(stats, np.arange(3)))
    assert stats.derived_table(_count_rows)[1, 0] == (8.0 + 3.0) * 2


def test_never_seen_is_the_nan_first_seen_mask_and_follows_first_events() -> None:
    stats = ItemStats.from_interactions(
        np.array([0, 2, 2]), np.array([0, 0, 1]), np.array([10, 20, 30]), np.ones(3, np.float32), 5, now=100
    )
    before = stats.never_seen()
    np.testing.assert_array_equal(before, np.isnan(stats.first_ts))
    assert before.tolist() == [False, True, False, True, True]
    stats.update(3, 40, 1.0, 0)
    after = stats.never_seen()
    np.testing.assert_array_equal(after, np.isnan(stats.first_ts))
    assert after[3] == np.False_ and before[3] == np.True_  # a reader's snapshot is not mutated
    stats.update(0, 50, 1.0, 1)  # an item seen before: the same mask object is kept
    assert stats.never_seen() is after


def test_never_seen_mask_cannot_be_written_by_callers() -> None:
    stats = ItemStats.from_interactions(
        np.array([0]), np.array([0]), np.array([10]), np.ones(1, np.float32), 3, now=100
    )
    with pytest.raises(ValueError):
        stats.never_seen()[1] = False
