from __future__ import annotations

import numpy as np
import pytest

from recsvc.behaviour import CoOccurrence, ItemStats
from recsvc.candidates import (
    SOURCE_BITS,
    SourceList,
    cooc_source,
    focus_on_query,
    generate,
    merge,
    repeat_source,
)
from recsvc.config import DAY, CandidateConfig
from recsvc.history import UserHistory

NOW = 50 * DAY


def _sl(source: str, items: list[int], scores: list[float] | None = None) -> SourceList:
    s = scores if scores is not None else [1.0] * len(items)
    return SourceList(source, np.array(items, np.int32), np.array(s, np.float32))


def test_merge_deduplicates_and_ors_source_bits() -> None:
    c = merge([_sl("ann", [5, 3], [0.9, 0.8]), _sl("popular", [3, 7])], 10)
    assert sorted(c.items.tolist()) == [3, 5, 7]
    row = c.items.tolist().index(3)
    assert c.sources[row] == SOURCE_BITS["ann"] | SOURCE_BITS["popular"]
    assert c.source_names(row) == ("ann", "popular")


def test_merge_keeps_ann_score_and_rank_only_for_ann_items() -> None:
    c = merge([_sl("ann", [5, 3], [0.9, 0.8]), _sl("popular", [7])], 10)
    by_item = {int(i): k for k, i in enumerate(c.items)}
    assert c.ann_rank[by_item[3]] == 1 and c.ann_score[by_item[3]] == np.float32(0.8)
    assert np.isnan(c.ann_score[by_item[7]]) and np.isnan(c.ann_rank[by_item[7]])


def test_merge_truncation_drops_least_specific_sources_first() -> None:
    c = merge([_sl("popular", [1, 2, 3]), _sl("repeat", [9]), _sl("ann", [8, 7])], 3)
    assert c.items.tolist() == [9, 8, 7]


def test_repeat_source_prefers_recent_and_frequent_items() -> None:
    h = UserHistory(
        np.array([1, 2, 2, 3], np.int32),
        np.array([NOW - 60 * DAY, NOW - 2 * DAY, NOW - DAY, NOW - 30 * DAY], np.int64),
        np.ones(4, np.float32),
    )
    s = repeat_source(h, NOW, 2, half_life_days=7.0)
    assert s.items.tolist() == [2, 3]


def _state() -> tuple[ItemStats, CoOccurrence]:
    item = np.array([0, 1, 0, 1, 4, 4, 4])
    user = np.array([0, 0, 1, 1, 2, 3, 4])
    ts = np.array([NOW - DAY - 5, NOW - DAY, NOW - DAY - 5, NOW - DAY, NOW - 1, NOW - 2, NOW - 3])
    w = np.ones(len(item), np.float32)
    return ItemStats.from_interactions(item, user, ts, w, 6, NOW), CoOccurrence.from_interactions(
        item, user, ts, w, 6, NOW
    )


def test_generate_unions_ann_repeat_cooc_and_popular_sources() -> None:
    stats, cooc = _state()
    history = UserHistory(np.array([0], np.int32), np.array([NOW - DAY], np.int64), np.ones(1, np.float32))
    c = generate(
        history,
        ann_items=np.array([5, 3, -1]),
        ann_scores=np.array([0.9, 0.5, 0.0]),
        stats=stats,
        cooc=cooc,
        cfg=CandidateConfig(),
        now=NOW,
    )
    names = {int(i): c.source_names(k) for k, i in enumerate(c.items)}
    assert names[5] == ("ann",) and names[3] == ("ann",)
    assert "repeat" in names[0]
    assert "cooc" in names[1]
    assert "popular" in names[4]
    assert -1 not in names


def test_generate_respects_per_source_caps_and_total_cap() -> None:
    stats, cooc = _state()
    cfg = CandidateConfig(ann=1, popular=1, max_candidates=2)
    c = generate(
        UserHistory.empty(),
        ann_items=np.array([5, 3]),
        ann_scores=np.array([0.9, 0.5]),
        stats=stats,
        cooc=cooc,
        cfg=cfg,
        now=NOW,
    )
    assert c.items.tolist() == [5, 4]


def test_generate_for_cold_user_without_ann_is_popularity() -> None:
    stats, cooc = _state()
    c = generate(
        UserHistory.empty(),
        ann_items=None,
        ann_scores=None,
        stats=stats,
        cooc=cooc,
        cfg=CandidateConfig(),
        now=NOW,
    )
    assert c.has("popular").all() and len(c) == len(stats.top_popular(50))


def _query_and_popular() -> object:
    return merge(
        [
            SourceList("query", np.array([1, 2], np.int32), np.array([0.9, 0.8], np.float32)),
            SourceList("popular", np.array([2, 3, 4], np.int32), np.array([3.0, 2.0, 1.0], np.float32)),
        ],
        10,
    )


def test_focus_on_query_drops_items_only_popularity_proposed() -> None:
    focused = focus_on_query(_query_and_popular(), min_keep=2)
    assert sorted(focused.items.tolist()) == [1, 2]  # 2 stays: the query proposed it too


def test_focus_on_query_keeps_popular_items_when_too_few_remain() -> None:
    focused = focus_on_query(_query_and_popular(), min_keep=3)
    assert sorted(focused.items.tolist()) == [1, 2, 3, 4]


def test_source_names_of_many_rows_match_one_row_at_a_time() -> None:
    c = merge([_sl("ann", [5, 3]), _sl("popular", [3, 7]), _sl("cooc", [7, 5]), _sl("session", [1])], 10)
    rows = np.array([3, 0, 2, 1])
    assert c.source_names_of(rows) == [c.source_names(int(i)) for i in rows]
    assert c.source_names(c.items.tolist().index(1)) == ("session",)


def test_cooc_source_sums_seed_weight_times_similarity_over_all_seeds() -> None:
    rng = np.random.default_rng(0)
    n = 40
    item = rng.integers(0, n, 600)
    user = rng.integers(0, 30, 600)
    ts = np.sort(rng.integers(NOW - 5 * DAY, NOW, 600))
    cooc = CoOccurrence.from_interactions(item, user, ts, np.ones(600, np.float32), n, NOW, neighbours=8)
    seeds = np.array([3, 0, 17, 39, 5], np.int32)  # includes items with empty neighbour rows
    weights = np.array([1.0, 0.5, 2.0, 1.5, 0.25], np.float32)
    expected: dict[int, float] = {}
    for s, w in zip(seeds, weights):
        for nb, sc in zip(*cooc.neighbours(int(s))):
            expected[int(nb)] = expected.get(int(nb), 0.0) + float(sc) * float(w)
    got = cooc_source(seeds, weights, cooc, n=100)
    assert dict(zip(got.items.tolist(), got.scores.tolist())) == pytest.approx(expected)
    assert np.all(np.diff(got.scores) <= 0)
