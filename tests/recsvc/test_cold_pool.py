from __future__ import annotations

import numpy as np
import pytest

from recsvc import cold_pool
from recsvc.cold_pool import COLD_NEIGHBOURS_DEPTH, ColdNeighbours
from recsvc.config import IndexConfig
from recsvc.retrieval import ItemIndex


def _catalogue(n: int = 300, dim: int = 16) -> tuple[ItemIndex, np.ndarray]:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return ItemIndex.build(emb, IndexConfig(use_gpu="never")), emb


def _mask(n: int, seen: list[int]) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[seen] = False
    mask.flags.writeable = False
    return mask


def test_lists_are_the_nearest_never_seen_items_best_first() -> None:
    index, emb = _catalogue()
    never_seen = _mask(len(emb), list(range(0, 300, 2)))
    lists = ColdNeighbours(index, emb, effort=1.0).lists(np.array([3, 4, 3]), never_seen)
    assert sorted(lists) == [3, 4]
    for item, got in lists.items():
        cos = emb @ emb[item]
        cos[~never_seen] = -np.inf
        assert got.tolist() == np.argsort(-cos)[:COLD_NEIGHBOURS_DEPTH].tolist()


def test_cached_lists_are_reused_until_the_mask_changes() -> None:
    index, emb = _catalogue()
    cold = ColdNeighbours(index, emb, effort=1.0)
    never_seen = _mask(len(emb), [0, 1])
    first = cold.lists(np.array([5]), never_seen)[5]
    assert cold.lists(np.array([5]), never_seen)[5] is first  # same object: no new search
    gone = int(first[0])
    changed = _mask(len(emb), [0, 1, gone])  # that item got its first event
    fresh = cold.lists(np.array([5]), changed)[5]
    assert gone not in fresh.tolist() and fresh is not first


def test_a_full_cache_restarts_and_still_answers_every_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cold_pool, "MAX_CACHED_ITEMS", 2)
    index, emb = _catalogue()
    never_seen = _mask(len(emb), [0])
    cold = ColdNeighbours(index, emb, effort=1.0)
    first = cold.lists(np.array([1, 2]), never_seen)
    again = cold.lists(np.array([1, 2, 3]), never_seen)  # 2 cached + 1 new > cap
    assert sorted(again) == [1, 2, 3]
    assert all(again[i].tolist() == first[i].tolist() for i in (1, 2))
    assert len(again[3]) == COLD_NEIGHBOURS_DEPTH and again[3].dtype == np.int32
