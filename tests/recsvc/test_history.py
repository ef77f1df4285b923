from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recsvc.catalog import Catalog
from recsvc.history import HistoryStore, UserHistory


def _catalog() -> Catalog:
    return Catalog.from_items(pl.DataFrame({"item_id": ["i0", "i1", "i2"], "title": ["a", "b", "c"]}))


def _interactions() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": ["u1", "u2", "u1", "u1", "u2"],
            "item_id": ["i2", "i0", "i0", "ghost", "i1"],
            "timestamp": [30, 10, 20, 25, 40],
            "weight": [1.0, 2.0, 4.0, 8.0, 1.0],
        },
        schema_overrides={"weight": pl.Float32},
    )


def test_get_returns_chronological_history_and_drops_unknown_items() -> None:
    store = HistoryStore.from_interactions(_interactions(), _catalog())
    h = store.get("u1")
    assert h.items.tolist() == [0, 2]
    assert h.timestamps.tolist() == [20, 30]
    assert h.weights.tolist() == [4.0, 1.0]


def test_unknown_user_gets_an_empty_history() -> None:
    store = HistoryStore.from_interactions(_interactions(), _catalog())
    assert len(store.get("nobody")) == 0


def test_append_keeps_time_order_and_adds_new_users() -> None:
    store = HistoryStore.from_interactions(_interactions(), _catalog())
    before = store.get("u1")
    store.append("u1", 1, 25, 2.0)
    store.append("new", 2, 99, 1.0)
    assert store.get("u1").items.tolist() == [0, 1, 2]
    assert before.items.tolist() == [0, 2]  # earlier readers keep their snapshot
    assert store.get("new").items.tolist() == [2]
    assert sorted(store.users()) == ["new", "u1", "u2"]


def test_save_and_load_round_trip_including_online_events(tmp_path: Path) -> None:
    cat = _catalog()
    store = HistoryStore.from_interactions(_interactions(), cat)
    store.append("u3", 1, 50, 4.0)
    store.save(tmp_path / "history.parquet")
    back = HistoryStore.load(tmp_path / "history.parquet", cat)
    for user in ("u1", "u2", "u3"):
        np.testing.assert_array_equal(back.get(user).items, store.get(user).items)
        np.testing.assert_array_equal(back.get(user).timestamps, store.get(user).timestamps)


def test_before_cuts_strictly_before_the_cutoff() -> None:
    h = UserHistory(np.array([0, 1, 2], np.int32), np.array([5, 10, 15], np.int64), np.ones(3, np.float32))
    assert h.before(10).items.tolist() == [0]
