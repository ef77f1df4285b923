from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsvc.behaviour import ItemStats
from recsvc.candidates import SourceList, merge
from recsvc.catalog import Catalog
from recsvc.config import DAY, CandidateConfig
from recsvc.features import FEATURE_NAMES, N_FEATURES, build_features, feature_index, tower_inputs
from recsvc.history import UserHistory

NOW = 40 * DAY


def _catalog() -> Catalog:
    return Catalog.from_items(
        pl.DataFrame(
            {
                "item_id": ["i0", "i1", "i2", "i3"],
                "title": ["a", "b", "c", "d"],
                "category": ["shoes", "shoes", "mugs", "mugs"],
                "brand": ["acme", "zeta", "acme", None],
                "price": [10.0, 30.0, 20.0, None],
            }
        )
    )


def _emb() -> np.ndarray:
    e = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _history() -> UserHistory:
    return UserHistory(
        np.array([0, 0, 2], np.int32),
        np.array([NOW - 5 * DAY, NOW - 2 * DAY, NOW - DAY], np.int64),
        np.array([1.0, 4.0, 1.0], np.float32),
    )


def _stats() -> ItemStats:
    item = np.array([0, 0, 1, 2])
    user = np.array([0, 0, 1, 1])
    ts = np.array([NOW - 5 * DAY, NOW - 2 * DAY, NOW - 3600, NOW - 20 * DAY])
    return ItemStats.from_interactions(item, user, ts, np.array([1, 4, 2, 1], np.float32), 4, NOW)


def _features(
    user_vec: np.ndarray | None = None, history: UserHistory | None = None
) -> tuple[np.ndarray, list[int]]:
    cands = merge(
        [
            SourceList("ann", np.array([1, 3], np.int32), np.array([0.9, 0.1], np.float32)),
            SourceList("repeat", np.array([0], np.int32), np.array([3.0], np.float32)),
        ],
        10,
    )
    x = build_features(
        _history() if history is None else history,
        cands,
        user_vec,
        _emb(),
        _catalog(),
        _stats(),
        NOW,
        CandidateConfig(),
    )
    return x, cands.items.tolist()


def _f(x: np.ndarray, items: list[int], item: int, name: str) -> float:
    return float(x[items.index(item), feature_index(name)])


def test_matrix_has_one_float32_column_per_feature_name() -> None:
    x, _ = _features()
    assert x.shape == (3, N_FEATURES) and x.dtype == np.float32
    assert len(set(FEATURE_NAMES)) == N_FEATURES


def test_text_interest_is_cosine_to_user_vector_and_recent_history() -> None:
    x, items = _features(user_vec=np.array([0, 1, 0], np.float32))
    assert _f(x, items, 1, "cos_user") == pytest.approx(0.6)
    assert _f(x, items, 1, "cos_hist_max") == pytest.approx(0.8)  # vs item 0
    assert _f(x, items, 1, "cos_hist_last") == pytest.approx(0.6)  # vs item 2
    assert _f(x, items, 1, "ann_rank") == 0 and _f(x, items, 3, "ann_score") == pytest.approx(0.1)


def test_missing_user_vector_and_non_ann_items_are_nan() -> None:
    x, items = _features(user_vec=None)
    assert np.isnan(_f(x, items, 1, "cos_user"))
    assert np.isnan(_f(x, items, 0, "ann_score"))


def test_source_indicators_match_the_proposing_sources() -> None:
    x, items = _features()
    assert _f(x, items, 0, "src_repeat") == 1 and _f(x, items, 0, "src_ann") == 0
    assert _f(x, items, 1, "src_ann") == 1 and _f(x, items, 1, "n_sources") == 1


def test_item_behaviour_counts_trend_and_recency() -> None:
    x, items = _features()
    assert _f(x, items, 0, "item_cnt_7d") == 5 and _f(x, items, 0, "item_cnt_1d") == 0
    assert _f(x, items, 0, "item_repurchase_rate") == 1.0
    assert _f(x, items, 1, "item_trend") == pytest.approx(2 / (2 / 7))
    assert _f(x, items, 0, "item_days_since_last") == pytest.approx(2.0)
    assert np.isnan(_f(x, items, 3, "item_days_since_first"))  # never seen


def test_user_item_affinity_shares_and_own_item_counts() -> None:
    x, items = _features()
    # history weights: item0 (shoes, acme) 5 of 6, item2 (mugs, acme) 1 of 6
    assert _f(x, items, 1, "attr0_share") == pytest.approx(5 / 6)  # category of item1 = shoes
    assert _f(x, items, 1, "attr1_share") == pytest.approx(0.0)  # brand zeta never seen
    assert np.isnan(_f(x, items, 3, "attr1_share"))  # item3 has no brand
    assert _f(x, items, 0, "ui_count") == 2 and _f(x, items, 0, "ui_weight") == 5
    assert _f(x, items, 0, "ui_days_since_last") == pytest.approx(2.0)
    assert _f(x, items, 1, "ui_count") == 0 and np.isnan(_f(x, items, 1, "ui_days_since_last"))


def test_price_ratio_is_item_price_over_users_mean_price() -> None:
    x, items = _features()
    # history prices 10, 10, 20 -> mean 40/3
    assert _f(x, items, 1, "price_ratio_user_mean") == pytest.approx(30 / (40 / 3))
    assert np.isnan(_f(x, items, 3, "item_price"))


def test_empty_history_gives_zero_activity_and_nan_affinity() -> None:
    x, items = _features(history=UserHistory.empty())
    assert _f(x, items, 1, "user_n_events") == 0 and _f(x, items, 1, "ui_count") == 0
    assert np.isnan(_f(x, items, 1, "attr0_share")) and np.isnan(_f(x, items, 1, "cos_hist_max"))


def test_tower_inputs_are_most_recent_first_and_capped() -> None:
    emb, ages, w = tower_inputs(_history(), _emb(), NOW, history_len=2)
    np.testing.assert_array_equal(emb, _emb()[[2, 0]])
    assert ages.tolist() == [DAY, 2 * DAY] and w.tolist() == [1.0, 4.0]
