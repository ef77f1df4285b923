from __future__ import annotations

import numpy as np
import pytest

from recsvc.behaviour import CoOccurrence, ItemStats, decay
from recsvc.candidate_kernels import cold_pool_rows, item_slots
from recsvc.candidates import (
    COOC_RECENT_ITEMS,
    NAMES_BY_BITS,
    SOURCE_BITS,
    Candidates,
    SourceList,
    cooc_source,
    focus_on_query,
    generate,
    generate_many,
    merge,
    popular_source,
)
from recsvc.config import DAY, CandidateConfig
from recsvc.history import UserHistory
from recsvc.retrieval import rescored

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


def _state() -> tuple[ItemStats, CoOccurrence]:
    item = np.array([0, 1, 0, 1, 4, 4, 4])
    user = np.array([0, 0, 1, 1, 2, 3, 4])
    ts = np.array([NOW - DAY - 5, NOW - DAY, NOW - DAY - 5, NOW - DAY, NOW - 1, NOW - 2, NOW - 3])
    w = np.ones(len(item), np.float32)
    return ItemStats.from_interactions(item, user, ts, w, 6, NOW), CoOccurrence.from_interactions(
        item, user, ts, w, 6, NOW
    )


def test_repeat_source_prefers_recent_and_frequent_items() -> None:
    stats, cooc = _state()
    h = UserHistory(
        np.array([1, 2, 2, 3], np.int32),
        np.array([NOW - 60 * DAY, NOW - 2 * DAY, NOW - DAY, NOW - 30 * DAY], np.int64),
        np.ones(4, np.float32),
    )
    cfg = CandidateConfig(repeat=2, popular=0, cooccurrence=0, cooc_half_life_days=7.0)
    c = generate(h, ann_items=None, ann_scores=None, stats=stats, cooc=cooc, cfg=cfg, now=NOW)
    assert c.items[c.has("repeat")].tolist() == [2, 3]


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


def test_source_names_name_the_sources_of_each_row_by_bitmask() -> None:
    c = merge([_sl("ann", [5, 3]), _sl("popular", [3, 7]), _sl("cooc", [7, 5]), _sl("session", [1])], 10)
    assert [NAMES_BY_BITS[int(b)] for b in c.sources] == [c.source_names(i) for i in range(len(c))]
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


# ---------------------------------------------------------------------------------------------
# The numpy definition of one user's candidates: the reference the compiled generate_block
# (behind generate and generate_many) is checked against, sum for sum and tie for tie.


def _ref_repeat_source(history: UserHistory, now: int, n: int, half_life_days: float) -> SourceList:
    """The user's own items by recency-weighted count (repurchase / re-view)."""
    if len(history) == 0 or n <= 0:
        return SourceList("repeat", np.zeros(0, np.int32), np.zeros(0, np.float32))
    w = history.weights * decay(now - history.timestamps, half_life_days)
    items, inverse = np.unique(history.items, return_inverse=True)
    scores = np.bincount(inverse, w, minlength=len(items)).astype(np.float32)
    best = np.argsort(-scores, kind="stable")[:n]
    return SourceList("repeat", items[best].astype(np.int32), scores[best])


def _ref_recent_seeds(history: UserHistory, now: int, half_life_days: float) -> tuple[np.ndarray, np.ndarray]:
    """The last COOC_RECENT_ITEMS distinct history items with their decayed weight (summed)."""
    if len(history) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    tail = slice(max(0, len(history) - 4 * COOC_RECENT_ITEMS), len(history))
    items = history.items[tail][::-1]
    w = (history.weights[tail] * decay(now - history.timestamps[tail], half_life_days))[::-1]
    unique, first, inverse = np.unique(items, return_index=True, return_inverse=True)
    totals = np.bincount(inverse, w, minlength=len(unique))
    keep = np.argsort(first, kind="stable")[:COOC_RECENT_ITEMS]
    return unique[keep].astype(np.int32), totals[keep].astype(np.float32)


def _ref_generate(
    history: UserHistory,
    *,
    ann_items: np.ndarray | None,
    ann_scores: np.ndarray | None,
    stats: ItemStats,
    cooc: CoOccurrence,
    cfg: CandidateConfig,
    now: int,
    extra: list[SourceList] | tuple[()] = (),
    cf_items: np.ndarray | None = None,
    cf_scores: np.ndarray | None = None,
) -> Candidates:
    lists: list[SourceList] = list(extra)
    if ann_items is not None and ann_scores is not None:
        valid = np.asarray(ann_items) >= 0
        items = np.asarray(ann_items)[valid][: cfg.ann].astype(np.int32)
        lists.append(SourceList("ann", items, np.asarray(ann_scores)[valid][: cfg.ann].astype(np.float32)))
    if cf_items is not None and cf_scores is not None and cfg.cf > 0:
        lists.append(
            SourceList("cf", cf_items[: cfg.cf].astype(np.int32), cf_scores[: cfg.cf].astype(np.float32))
        )
    lists.append(_ref_repeat_source(history, now, cfg.repeat, cfg.cooc_half_life_days))
    seeds, seed_w = _ref_recent_seeds(history, now, cfg.cooc_half_life_days)
    lists.append(cooc_source(seeds, seed_w, cooc, cfg.cooccurrence))
    lists.append(popular_source(stats, cfg.popular))
    return merge(lists, cfg.max_candidates)


_FIELDS = ("items", "sources", "ann_score", "ann_rank", "cooc_score", "repeat_score", "cf_rank")


def _assert_same_candidates(got: Candidates, expected: Candidates) -> None:
    for name in _FIELDS:
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)  # nan == nan here, bit-exact otherwise


def _random_users(seed: int, n_users: int, n_items: int) -> dict[str, list]:
    """Histories of mixed lengths (empty, short, longer than the seed window, repeats and ties),
    each with an ANN list or none, some with session/query extras and cf lists."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {
        k: [] for k in ("histories", "ann", "ann_scores", "nows", "extras", "cf", "cf_scores")
    }
    for u in range(n_users):
        length = int(rng.choice([0, 1, 5, 30, 120]))
        items = rng.integers(0, 12 if u % 3 == 0 else n_items, length).astype(np.int32)  # u % 3: many repeats
        ts = np.sort(rng.integers(NOW - 40 * DAY, NOW, length)).astype(np.int64)
        if length > 3:
            ts[1:3] = ts[1]  # equal timestamps
        weights = rng.choice(np.array([1.0, 2.0, 8.0], np.float32), length)
        out["histories"].append(UserHistory(items, ts, weights))
        out["nows"].append(NOW - int(rng.integers(0, 2 * DAY)))
        if rng.random() < 0.8:
            ann = np.concatenate([rng.choice(n_items, 30, replace=False), [-1, -1]]).astype(np.int64)
            scores = np.round(rng.random(len(ann)), 1).astype(np.float32)  # tied scores
            out["ann"].append(ann)
            out["ann_scores"].append(scores)
        else:
            out["ann"].append(None)
            out["ann_scores"].append(None)
        extras = []
        if rng.random() < 0.3:
            extras.append(_sl("session", rng.integers(0, n_items, 4).tolist()))
        if rng.random() < 0.2:
            extras.append(_sl("query", rng.integers(0, n_items, 6).tolist(), rng.random(6).tolist()))
        out["extras"].append(extras)
        has_cf = rng.random() < 0.5
        out["cf"].append(rng.choice(n_items, 20, replace=False).astype(np.int32) if has_cf else None)
        out["cf_scores"].append(np.sort(rng.random(20)).astype(np.float32)[::-1] if has_cf else None)
    return out


def _behaviour(seed: int, n_items: int) -> tuple[ItemStats, CoOccurrence]:
    rng = np.random.default_rng(seed)
    n = 3000
    item = rng.integers(0, n_items, n)
    user = rng.integers(0, 80, n)
    ts = np.sort(rng.integers(NOW - 20 * DAY, NOW, n))
    w = rng.choice(np.array([1.0, 2.0], np.float32), n)
    return ItemStats.from_interactions(item, user, ts, w, n_items, NOW), CoOccurrence.from_interactions(
        item, user, ts, w, n_items, NOW, neighbours=10
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_many_equals_the_numpy_definition_for_each_user_bit_for_bit(seed: int) -> None:
    n_items = 200
    stats, cooc = _behaviour(seed, n_items)
    users = _random_users(seed, 40, n_items)
    cfg = CandidateConfig(ann=25, repeat=6, popular=15, cooccurrence=12, cf=10, max_candidates=60)
    got = generate_many(
        users["histories"],
        ann_items=users["ann"],
        ann_scores=users["ann_scores"],
        stats=stats,
        cooc=cooc,
        cfg=cfg,
        nows=users["nows"],
        extras=users["extras"],
        cf_items=users["cf"],
        cf_scores=users["cf_scores"],
    )
    assert len(got) == 40
    for i in range(40):
        expected = _ref_generate(
            users["histories"][i],
            ann_items=users["ann"][i],
            ann_scores=users["ann_scores"][i],
            stats=stats,
            cooc=cooc,
            cfg=cfg,
            now=users["nows"][i],
            extra=users["extras"][i],
            cf_items=users["cf"][i],
            cf_scores=users["cf_scores"][i],
        )
        _assert_same_candidates(got[i], expected)


def test_generate_many_without_any_history_or_ann_gives_everyone_popularity() -> None:
    stats, cooc = _behaviour(3, 50)
    got = generate_many(
        [UserHistory.empty()] * 3,
        ann_items=[None] * 3,
        ann_scores=[None] * 3,
        stats=stats,
        cooc=cooc,
        cfg=CandidateConfig(popular=7),
        nows=[NOW] * 3,
    )
    assert [c.items.tolist() for c in got] == [stats.top_popular(7).tolist()] * 3


def test_generate_many_rejects_inputs_of_different_lengths() -> None:
    stats, cooc = _state()
    with pytest.raises(ValueError, match="same length"):
        generate_many(
            [UserHistory.empty()],
            ann_items=[],
            ann_scores=[],
            stats=stats,
            cooc=cooc,
            cfg=CandidateConfig(),
            nows=[NOW],
        )


def test_generate_many_equals_the_numpy_definition_with_repeats_in_a_list_and_extras_of_any_source() -> None:
    stats, cooc = _behaviour(4, 30)
    histories = [
        UserHistory(
            np.array([3, 4, 3], np.int32), np.array([NOW - 9, NOW - 5, NOW - 1]), np.ones(3, np.float32)
        ),
        UserHistory.empty(),
        UserHistory(np.array([7], np.int32), np.array([NOW - 2]), np.ones(1, np.float32)),
        UserHistory.empty(),
    ]
    extras = [
        [
            _sl("popular", [1, 2, 3]),
            _sl("query", [8, 7, 8], [0.5, 0.4, 0.3]),
            _sl("repeat", [9, 1], [2.0, 1.0]),
        ],
        [],
        [_sl("cooc", [4, 4, 5], [0.1, 0.2, 0.3]), _sl("session", [5, 6, 5])],
        [_sl("query", [], [])],
    ]
    ann = [np.array([8, 7, 8, -1]), None, np.array([2, 3]), None]
    ann_scores = [np.array([0.9, 0.8, 0.7, 0.0], np.float32), None, np.array([0.5, 0.5], np.float32), None]
    cfg = CandidateConfig(ann=3, repeat=2, popular=4, cooccurrence=3, max_candidates=6)
    got = generate_many(
        histories,
        ann_items=ann,
        ann_scores=ann_scores,
        stats=stats,
        cooc=cooc,
        cfg=cfg,
        nows=[NOW] * 4,
        extras=extras,
    )
    for i, candidates in enumerate(got):
        expected = _ref_generate(
            histories[i],
            ann_items=ann[i],
            ann_scores=ann_scores[i],
            stats=stats,
            cooc=cooc,
            cfg=cfg,
            now=NOW,
            extra=extras[i],
        )
        _assert_same_candidates(candidates, expected)


def test_a_history_item_outside_the_cooccurrence_table_is_refused_not_read_out_of_bounds() -> None:
    stats, cooc = _behaviour(0, 50)
    history = UserHistory(np.array([3, 60], np.int32), np.array([NOW - 9, NOW - 1]), np.ones(2, np.float32))
    with pytest.raises(IndexError, match="outside the co-occurrence table"):
        generate_many(
            [history],
            ann_items=[None],
            ann_scores=[None],
            stats=stats,
            cooc=cooc,
            cfg=CandidateConfig(),
            nows=[NOW],
        )


def test_generate_many_leaves_its_item_scratch_all_unset() -> None:
    n_items = 200
    stats, cooc = _behaviour(5, n_items)
    users = _random_users(5, 30, n_items)
    generate_many(
        users["histories"],
        ann_items=users["ann"],
        ann_scores=users["ann_scores"],
        stats=stats,
        cooc=cooc,
        cfg=CandidateConfig(),
        nows=users["nows"],
        extras=users["extras"],
        cf_items=users["cf"],
        cf_scores=users["cf_scores"],
    )
    assert (item_slots(n_items) == -1).all()


def _ref_cold_rows(
    pool: np.ndarray, cands: np.ndarray, vec: np.ndarray | None, emb: np.ndarray
) -> np.ndarray:
    """The numpy definition the kernel replaced: distinct pool items not among the candidates,
    rescored best first (ties by item) when there is a vector."""
    items = np.unique(pool[pool >= 0]).astype(np.int32)
    items = items[~np.isin(items, cands)]
    return items if vec is None else rescored(emb, items, vec)[0]


@pytest.mark.parametrize("dim", [8, 40])
def test_cold_pool_rows_equal_the_numpy_definition_and_leave_the_scratch_unset(dim: int) -> None:
    rng = np.random.default_rng(dim)
    n_items = 400
    emb = rng.standard_normal((n_items, dim)).astype(np.float32)
    emb[7] = emb[3]  # a tie: equal scores must come by item
    pools, cands, vecs = [], [], []
    for r in range(40):
        pool = rng.integers(-1, 60 if r % 4 else n_items, int(rng.integers(0, 30))).astype(np.int32)
        if r % 5 == 0:
            pool = np.concatenate([pool, [3, 7, 3]]).astype(np.int32)
        pools.append(pool)
        cands.append(rng.choice(n_items, int(rng.integers(0, 50)), replace=False).astype(np.int32))
        vecs.append(None if r % 3 == 0 else rng.standard_normal(dim).astype(np.float32))
    slot = item_slots(n_items)
    items, scores, bounds = cold_pool_rows(
        np.concatenate(pools),
        np.cumsum([0] + [len(p) for p in pools]),
        np.concatenate(cands),
        np.cumsum([0] + [len(c) for c in cands]),
        np.vstack([np.zeros(dim, np.float32) if v is None else v for v in vecs]),
        np.array([v is not None for v in vecs]),
        emb,
        slot,
    )
    assert (slot[:n_items] == -1).all()
    for r, (pool, cand, vec) in enumerate(zip(pools, cands, vecs)):
        rows = slice(bounds[r], bounds[r + 1])
        np.testing.assert_array_equal(items[rows], _ref_cold_rows(pool, cand, vec, emb))
        if vec is None:
            assert np.isnan(scores[rows]).all()
        else:
            np.testing.assert_allclose(scores[rows], emb[items[rows]] @ vec, rtol=0, atol=1e-5)
