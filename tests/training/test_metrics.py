from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    PAD,
    average_precision_at_k,
    catalogue_coverage,
    cold_start_recall,
    hit_rate_at_k,
    hits_from_indices,
    hits_from_lists,
    map_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    relevance_keys,
)

# User 0: list a b c d, relevant {b, d, z}  -> hits at ranks 2 and 4.
# User 1: list e f,     relevant {e}        -> hit at rank 1, list shorter than k.
RECS = [["a", "b", "c", "d"], ["e", "f"]]
REL = [{"b", "d", "z"}, {"e"}]
N_REL = [3, 1]


def test_hits_from_lists_marks_relevant_ranks_and_pads_short_lists() -> None:
    hits = hits_from_lists(RECS, REL)
    assert hits.tolist() == [[False, True, False, True], [True, False, False, False]]


def test_recall_divides_hits_by_relevant_count() -> None:
    hits = hits_from_lists(RECS, REL)
    # k=2: user0 1 hit / 3 relevant; user1 1/1.   k=4: user0 2/3; user1 1/1.
    assert recall_at_k(hits, N_REL, 2) == pytest.approx([1 / 3, 1.0])
    assert recall_at_k(hits, N_REL, 4) == pytest.approx([2 / 3, 1.0])


def test_precision_divides_by_k_even_for_short_lists() -> None:
    hits = hits_from_lists(RECS, REL)
    # k=4: user0 2/4; user1 has 2 items, 1 hit -> 1/4.
    assert precision_at_k(hits, 4) == pytest.approx([0.5, 0.25])


def test_hit_rate_is_one_when_any_hit_in_top_k() -> None:
    hits = hits_from_lists(RECS, REL)
    # k=1: user0's first item a misses, user1's e hits.
    assert hit_rate_at_k(hits, 1).tolist() == [0.0, 1.0]
    assert hit_rate_at_k(hits, 2).tolist() == [1.0, 1.0]


def test_ndcg_uses_binary_gains_and_ideal_over_min_relevant_k() -> None:
    hits = hits_from_lists(RECS, REL)
    # user0, k=4: DCG = 1/log2(3) + 1/log2(5); ideal has min(3,4)=3 hits: 1 + 1/log2(3) + 1/log2(4).
    dcg0 = 1 / math.log2(3) + 1 / math.log2(5)
    idcg0 = 1 + 1 / math.log2(3) + 0.5
    # user1: hit at rank 1, one relevant -> perfect.
    assert ndcg_at_k(hits, N_REL, 4) == pytest.approx([dcg0 / idcg0, 1.0])
    # user0, k=2: DCG = 1/log2(3); ideal over min(3,2)=2: 1 + 1/log2(3).
    assert ndcg_at_k(hits, N_REL, 2)[0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_average_precision_follows_hm_kaggle_definition() -> None:
    hits = hits_from_lists(RECS, REL)
    # user0, k=4: P@2 = 1/2, P@4 = 2/4 -> (0.5 + 0.5) / min(3, 4) = 1/3.
    # user0, k=2: P@2 = 1/2 -> 0.5 / min(3, 2) = 0.25.
    assert average_precision_at_k(hits, N_REL, 4) == pytest.approx([1 / 3, 1.0])
    assert average_precision_at_k(hits, N_REL, 2) == pytest.approx([0.25, 1.0])
    # MAP@4 = (1/3 + 1) / 2.
    assert map_at_k(hits, N_REL, 4) == pytest.approx(2 / 3)


def test_metrics_reject_users_without_relevant_items() -> None:
    hits = hits_from_lists(RECS, REL)
    with pytest.raises(ValueError, match="n_relevant"):
        recall_at_k(hits, [3, 0], 2)


def test_hits_from_indices_matches_list_version() -> None:
    # Items a..f, z -> indices 0..6; PAD for user1's missing ranks.
    idx = {name: i for i, name in enumerate("abcdefz")}
    recs = np.array([[0, 1, 2, 3], [4, 5, PAD, PAD]])
    rows = np.array([0, 0, 0, 1])
    items = np.array([idx["b"], idx["d"], idx["z"], idx["e"]])
    keys = relevance_keys(rows, items, n_items=7)
    assert hits_from_indices(recs, keys, 7).tolist() == hits_from_lists(RECS, REL).tolist()


def test_hits_from_indices_never_counts_padding() -> None:
    # Item 6 of a 7-item catalogue is relevant for row 0; key 6 must not match PAD in row 1 (key 7-1=6).
    recs = np.array([[PAD], [PAD]])
    keys = relevance_keys(np.array([0]), np.array([6]), n_items=7)
    assert not hits_from_indices(recs, keys, 7).any()


def test_coverage_counts_distinct_items_in_top_k_over_catalogue() -> None:
    recs = np.array([[0, 1, 2], [1, 3, PAD]])
    # k=2: {0, 1, 3} -> 3 of 10 items.   k=3: {0, 1, 2, 3} -> 4 of 10.
    assert catalogue_coverage(recs, 2, 10) == pytest.approx(0.3)
    assert catalogue_coverage(recs, 3, 10) == pytest.approx(0.4)


def test_cold_start_recall_only_counts_items_without_train_interactions() -> None:
    recs = np.array([[0, 5, 1], [2, 3, 4]])
    # Held out: row0 {5 (cold), 7 (cold)}, row1 {3 (warm)}; cold items = {5, 7}.
    rows = np.array([0, 0, 1])
    items = np.array([5, 7, 3])
    cold = np.zeros(8, dtype=bool)
    cold[[5, 7]] = True
    # Only row0 has cold held-out items: 1 of its 2 cold items is recommended -> 0.5, 1 user.
    value, users = cold_start_recall(recs, rows, items, cold, n_items=8, k=3)
    assert (value, users) == (pytest.approx(0.5), 1)
    # At k=1 row0's list is [0] -> 0 hits.
    assert cold_start_recall(recs, rows, items, cold, n_items=8, k=1)[0] == 0.0


def test_cold_start_recall_is_nan_without_cold_items() -> None:
    recs = np.array([[0, 1]])
    value, users = cold_start_recall(recs, np.array([0]), np.array([1]), np.zeros(3, dtype=bool), 3, 2)
    assert math.isnan(value) and users == 0


def test_hits_from_indices_agrees_with_set_lookup_on_many_users() -> None:
    rng = np.random.default_rng(0)
    recs = rng.integers(0, 1_000, size=(30_000, 200))
    rows = np.repeat(np.arange(30_000), 3)
    items = rng.integers(0, 1_000, size=rows.size)
    hits = hits_from_indices(recs, relevance_keys(rows, items, 1_000), 1_000)
    assert hits.any()  # ~45% of users have a hit at this density, so a constant answer would fail
    for u in rng.choice(30_000, size=50, replace=False):
        relevant = set(items[rows == u].tolist())
        assert hits[u].tolist() == [int(i) in relevant for i in recs[u]]
