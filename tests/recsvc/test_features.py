from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from recsvc.behaviour import USER_FEATURE_NAMES, CoOccurrence, ItemStats, decay, user_behaviour
from recsvc.candidate_kernels import item_slots
from recsvc.candidates import SOURCE_NAMES, Candidates, SourceList, generate, merge
from recsvc.catalog import Catalog
from recsvc.config import DAY, CandidateConfig
from recsvc.feature_kernels import segment_sums
from recsvc.features import (
    AFFINITY_SLOTS,
    FEATURE_NAMES,
    HISTORY_COS_ITEMS,
    N_FEATURES,
    build_features,
    build_features_many,
    feature_index,
    pairwise_dot,
    tower_inputs,
)
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


def _random_case(
    seed: int, n_users: int, dim: int = 16
) -> tuple[
    Catalog, np.ndarray, ItemStats, CoOccurrence, list[UserHistory], list[Candidates], list, list[int]
]:
    """Realistic mixed batch: empty, short, long and repeat-heavy histories; missing attribute
    codes and prices; users with and without a user vector; several reference times."""
    rng = np.random.default_rng(seed)
    n_items = 300
    catalog = Catalog.from_items(
        pl.DataFrame(
            {
                "item_id": [f"i{i}" for i in range(n_items)],
                "title": [f"t{i}" for i in range(n_items)],
                "category": [f"c{i % 7}" if i % 11 else None for i in range(n_items)],
                "brand": [f"b{i % 23}" if i % 5 else None for i in range(n_items)],
                "colour": [f"k{i % 3}" for i in range(n_items)],
                "material": [None if i % 2 else f"m{i % 4}" for i in range(n_items)],
                "fit": [f"f{i % 2}" for i in range(n_items)],
                "price": [float(rng.uniform(1, 90)) if i % 9 else None for i in range(n_items)],
            }
        )
    )
    emb = rng.standard_normal((n_items, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    n_events = 4000
    ev_items = (rng.zipf(1.4, n_events) % n_items).astype(np.int64)
    ev_users = rng.integers(0, 200, n_events)
    ev_ts = np.sort(rng.integers(NOW - 60 * DAY, NOW, n_events))
    ev_w = rng.choice(np.array([1.0, 2.0, 8.0], np.float32), n_events)
    stats = ItemStats.from_interactions(ev_items, ev_users, ev_ts, ev_w, n_items, NOW)
    cooc = CoOccurrence.from_interactions(ev_items, ev_users, ev_ts, ev_w, n_items, NOW)
    cfg = CandidateConfig(ann=60, repeat=20, popular=30, cooccurrence=40, max_candidates=120)
    histories, cands, vecs, nows = [], [], [], []
    for u in range(n_users):
        length = [0, 1, 3, 40, 150][u % 5]
        now = NOW - int(rng.integers(0, 3 * DAY))
        items = rng.choice(np.arange(20), length) if u % 7 == 3 else rng.integers(0, n_items, length)
        ts = np.sort(rng.integers(now - 90 * DAY, now, length)).astype(np.int64)
        h = UserHistory(items.astype(np.int32), ts, rng.choice(np.array([1.0, 0.5, 4.0], np.float32), length))
        vec = None if u % 3 == 0 else emb[rng.integers(0, n_items)]
        ann = np.argsort(-(emb @ vec))[:60].astype(np.int32) if vec is not None else None
        ann_scores = (emb[ann] @ vec).astype(np.float32) if vec is not None else None
        c = generate(h, ann_items=ann, ann_scores=ann_scores, stats=stats, cooc=cooc, cfg=cfg, now=now)
        if u % 6 == 5:
            c = Candidates.empty()
        histories.append(h)
        cands.append(c)
        vecs.append(vec)
        nows.append(now)
    return catalog, emb, stats, cooc, histories, cands, vecs, nows


_COSINE_COLUMNS = [feature_index(n) for n in ("cos_user", "cos_hist_max", "cos_hist_mean", "cos_hist_last")]


def _assert_matches_reference(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to the numpy reference: bit for bit except the cosines, which the compiled kernel
    sums in another order than BLAS (equal within float32 rounding, nan in the same places)."""
    other = [j for j in range(N_FEATURES) if j not in _COSINE_COLUMNS]
    np.testing.assert_array_equal(actual[:, other], expected[:, other])
    np.testing.assert_allclose(actual[:, _COSINE_COLUMNS], expected[:, _COSINE_COLUMNS], rtol=0, atol=2e-6)


def test_build_features_reproduces_the_pre_batching_definition() -> None:
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(0, 30)
    cfg = CandidateConfig()
    for h, c, v, t in zip(histories, cands, vecs, nows):
        expected = _ref_build_features(h, c, v, emb, catalog, stats, t, cfg)
        _assert_matches_reference(build_features(h, c, v, emb, catalog, stats, t, cfg), expected)


def test_build_features_many_equals_one_user_at_a_time() -> None:
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(1, 40)
    cfg = CandidateConfig()
    many = build_features_many(histories, cands, vecs, emb, catalog, stats, nows, cfg)
    one_by_one = [
        _ref_build_features(h, c, v, emb, catalog, stats, t, cfg)
        for h, c, v, t in zip(histories, cands, vecs, nows)
    ]
    assert many.shape == (sum(len(c) for c in cands), N_FEATURES)
    _assert_matches_reference(many, np.vstack(one_by_one))
    singles = [
        build_features(h, c, v, emb, catalog, stats, t, cfg)
        for h, c, v, t in zip(histories, cands, vecs, nows)
    ]
    np.testing.assert_array_equal(many, np.vstack(singles))  # batching itself changes no bit


def test_item_features_follow_online_updates_of_item_stats() -> None:
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(2, 10)
    cfg = CandidateConfig()
    build_features_many(histories, cands, vecs, emb, catalog, stats, nows, cfg)  # caches the table
    hot = int(cands[1].items[0])
    stats.update(hot, NOW, 8.0, user_prior_count=1)
    after = build_features(histories[1], cands[1], vecs[1], emb, catalog, stats, nows[1], cfg)
    expected = _ref_build_features(histories[1], cands[1], vecs[1], emb, catalog, stats, nows[1], cfg)
    _assert_matches_reference(after, expected)
    assert after[0, feature_index("item_cnt_all")] == stats.counts[hot, 3]


def test_build_features_many_rejects_misaligned_inputs() -> None:
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(3, 4)
    with pytest.raises(ValueError, match="same length"):
        build_features_many(histories, cands[:3], vecs, emb, catalog, stats, nows, CandidateConfig())


# ---------------------------------------------------------------------------------------------
# The one-user feature code as it stood before the batched rewrite (bundles' rankers were trained
# on its output), kept verbatim as the reference that build_features / build_features_many must
# reproduce bit for bit.

_C = {name: j for j, name in enumerate(FEATURE_NAMES)}


def _ref_build_features(
    history: UserHistory,
    cands: Candidates,
    user_vec: np.ndarray | None,
    item_emb: np.ndarray,
    catalog: Catalog,
    stats: ItemStats,
    now: int,
    cfg: CandidateConfig,
) -> np.ndarray:
    """Feature matrix float32 [len(cands), N_FEATURES] for one user at time `now`.

    `history` must contain only what was known before `now` (training passes histories cut at the
    cutoff; serving passes bundle history + events since), `item_emb` rows are L2-normalised.
    """
    n = len(cands)
    out = np.full((n, N_FEATURES), np.nan, dtype=np.float32)
    if n == 0:
        return out
    items = cands.items
    cand_emb = item_emb[items]
    _ref_text_features(out, history, cands, cand_emb, user_vec, item_emb)
    _ref_source_features(out, cands)
    _ref_item_features(out, items, stats, now)
    attributes = list(catalog.attributes.values())
    diversity_codes = attributes[0] if attributes else None
    out[:, _C["user_n_events"] : _C["user_n_events"] + len(USER_FEATURE_NAMES)] = user_behaviour(
        history, now, diversity_codes
    )
    _ref_affinity_features(out, history, items, catalog, now, cfg)
    _ref_price_features(out, history, items, catalog)
    return out


def _ref_text_features(
    out: np.ndarray,
    history: UserHistory,
    cands: Candidates,
    cand_emb: np.ndarray,
    user_vec: np.ndarray | None,
    item_emb: np.ndarray,
) -> None:
    if user_vec is not None:
        out[:, _C["cos_user"]] = cand_emb @ np.asarray(user_vec, dtype=np.float32)
    if len(history):
        recent = history.items[-HISTORY_COS_ITEMS:]
        sims = pairwise_dot(cand_emb, item_emb[recent])  # [n, k]
        out[:, _C["cos_hist_max"]] = sims.max(axis=1)
        out[:, _C["cos_hist_mean"]] = sims.mean(axis=1)
        out[:, _C["cos_hist_last"]] = sims[:, -1]
    out[:, _C["ann_score"]] = cands.ann_score
    out[:, _C["ann_rank"]] = cands.ann_rank
    out[:, _C["cooc_score"]] = cands.cooc_score
    out[:, _C["repeat_score"]] = cands.repeat_score


def _ref_source_features(out: np.ndarray, cands: Candidates) -> None:
    total = np.zeros(len(cands), dtype=np.float32)
    for name in SOURCE_NAMES:
        has = cands.has(name).astype(np.float32)
        out[:, _C[f"src_{name}"]] = has
        total += has
    out[:, _C["n_sources"]] = total


def _ref_item_features(out: np.ndarray, items: np.ndarray, stats: ItemStats, now: int) -> None:
    counts = stats.counts[items]
    out[:, _C["item_cnt_1d"] : _C["item_cnt_all"] + 1] = counts
    users = stats.users[items]
    out[:, _C["item_users"]] = users
    week = counts[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, _C["item_trend"]] = np.where(week > 0, counts[:, 0] / (week / 7.0), np.nan)
        out[:, _C["item_repurchase_rate"]] = np.where(users > 0, stats.repeat_users[items] / users, np.nan)
    out[:, _C["item_days_since_last"]] = (now - stats.last_ts[items]) / DAY
    out[:, _C["item_days_since_first"]] = (now - stats.first_ts[items]) / DAY


def _ref_affinity_features(
    out: np.ndarray, history: UserHistory, items: np.ndarray, catalog: Catalog, now: int, cfg: CandidateConfig
) -> None:
    if len(history) == 0:
        out[:, _C["ui_count"]] = 0.0
        out[:, _C["ui_weight"]] = 0.0
        out[:, _C["ui_decayed"]] = 0.0
        return
    w = history.weights.astype(np.float64)
    total = w.sum()
    shares = []
    for j, (name, codes) in enumerate(catalog.attributes.items()):
        hist_codes = codes[history.items]
        known = hist_codes >= 0
        per_value = np.bincount(hist_codes[known], w[known], minlength=len(catalog.attribute_values[name]))
        per_value = per_value / total if total > 0 else per_value
        cand_codes = codes[items]
        share = np.where(cand_codes >= 0, per_value[np.maximum(cand_codes, 0)], np.nan).astype(np.float32)
        shares.append(share)
        if j < AFFINITY_SLOTS:
            out[:, _C[f"attr{j}_share"]] = share
    if shares:
        stacked = np.vstack(shares)
        finite = np.isfinite(stacked)
        n_known = finite.sum(axis=0)
        filled = np.where(finite, stacked, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, _C["attr_share_mean"]] = np.where(n_known > 0, filled.sum(axis=0) / n_known, np.nan)
        out[:, _C["attr_share_max"]] = np.where(
            n_known > 0, np.where(finite, stacked, -1.0).max(axis=0), np.nan
        )
    # how often / how much / how recently the user had this very item
    uniq, inverse = np.unique(history.items, return_inverse=True)
    count = np.bincount(inverse, minlength=len(uniq)).astype(np.float32)
    weight = np.bincount(inverse, w, minlength=len(uniq)).astype(np.float32)
    decayed = np.bincount(
        inverse, w * decay(now - history.timestamps, cfg.cooc_half_life_days), minlength=len(uniq)
    ).astype(np.float32)
    last = np.full(len(uniq), -np.inf)
    np.maximum.at(last, inverse, history.timestamps.astype(np.float64))
    pos = np.minimum(np.searchsorted(uniq, items), len(uniq) - 1)
    had = uniq[pos] == items
    out[:, _C["ui_count"]] = np.where(had, count[pos], 0.0)
    out[:, _C["ui_weight"]] = np.where(had, weight[pos], 0.0)
    out[:, _C["ui_decayed"]] = np.where(had, decayed[pos], 0.0)
    out[:, _C["ui_days_since_last"]] = np.where(had, (now - last[pos]) / DAY, np.nan)


def _ref_price_features(out: np.ndarray, history: UserHistory, items: np.ndarray, catalog: Catalog) -> None:
    price = catalog.price[items]
    out[:, _C["item_price"]] = price
    if len(history):
        hist_price = catalog.price[history.items]
        known = np.isfinite(hist_price)
        if known.any():
            mean = float(hist_price[known].mean())
            if mean > 0:
                out[:, _C["price_ratio_user_mean"]] = price / mean


def test_cf_features_many_equal_one_user_at_a_time_and_match_the_factors() -> None:
    from recsvc.collaborative import CFModel

    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(4, 30)
    rng = np.random.default_rng(9)
    factors = rng.normal(size=(len(catalog), 5)).astype(np.float32)
    factors[::7] = 0.0  # items nobody had: no factor
    cf = CFModel(factors, 0.1, 1.0, 0.0)
    user_factors = [cf.user_factor(h, t) for h, t in zip(histories, nows)]
    cfg = CandidateConfig()
    many = build_features_many(
        histories, cands, vecs, emb, catalog, stats, nows, cfg, cf=cf, cf_user_factors=user_factors
    )
    singles = [
        build_features(h, c, v, emb, catalog, stats, t, cfg, cf=cf, cf_user_factor=u)
        for h, c, v, t, u in zip(histories, cands, vecs, nows, user_factors)
    ]
    np.testing.assert_array_equal(many, np.vstack(singles))
    for c, x, u in zip(cands, singles, user_factors):
        score = x[:, feature_index("cf_score")]
        if u is None or len(c) == 0:
            assert np.isnan(score).all()
            continue
        expected = np.where(factors[c.items].any(axis=1), factors[c.items] @ u, np.nan)
        np.testing.assert_allclose(score, expected, rtol=1e-5)
        best = np.nanmax(score)
        if best > 0:
            np.testing.assert_allclose(x[:, feature_index("cf_score_rel")], score / best, rtol=1e-6)


def test_a_catalogue_without_attributes_gets_nan_shares_and_every_other_column_as_the_reference() -> None:
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(5, 12)
    bare = Catalog(catalog.item_ids, catalog.index, {}, {}, catalog.price)
    cfg = CandidateConfig()
    got = build_features_many(histories, cands, vecs, emb, bare, stats, nows, cfg)
    expected = [
        _ref_build_features(h, c, v, emb, bare, stats, t, cfg)
        for h, c, v, t in zip(histories, cands, vecs, nows)
    ]
    _assert_matches_reference(got, np.vstack(expected))
    for name in ("attr0_share", "attr_share_mean", "attr_share_max"):
        assert np.isnan(got[:, feature_index(name)]).all()


def test_the_compiled_kernels_leave_their_item_scratch_all_unset() -> None:
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(6, 20)
    build_features_many(histories, cands, vecs, emb, catalog, stats, nows, CandidateConfig())
    assert (item_slots(len(catalog)) == -1).all()  # the next call in this thread starts clean


def test_a_candidates_cosines_do_not_depend_on_its_position_in_the_list() -> None:
    """The cosine kernel takes candidates four at a time; a candidate's bits must not depend on
    which group (or the padded last one) it lands in."""
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(3, 30, dim=72)
    cfg = CandidateConfig()
    checked = 0
    for h, c, v, t in zip(histories, cands, vecs, nows):
        if len(c) < 6:
            continue
        base = build_features(h, c, v, emb, catalog, stats, t, cfg)[:, _COSINE_COLUMNS]
        for order in (np.arange(len(c))[::-1], np.roll(np.arange(len(c)), 1), np.arange(1, len(c) - 1)):
            moved = build_features(h, c.take(order), v, emb, catalog, stats, t, cfg)[:, _COSINE_COLUMNS]
            np.testing.assert_array_equal(moved, base[order])
            checked += 1
    assert checked >= 30


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segment_sums_equal_numpys_sum_of_each_segment_bit_for_bit(dtype: type) -> None:
    """numpy sums pairwise; a sequential sum differs in the last bits from 9 values up."""
    rng = np.random.default_rng(5)
    lengths = [0, 1, 7, 8, 9, 15, 16, 17, 127, 128, 129, 255, 256, 1000, 9000]
    values = (rng.random(sum(lengths)) * rng.choice([0.5, 1.0, 3.7, 8.0], sum(lengths))).astype(dtype)
    offsets = np.cumsum([0, *lengths]).astype(np.int64)
    sums = segment_sums(values, offsets)
    assert sums.dtype == dtype
    expected = [values[a:b].sum() for a, b in itertools.pairwise(offsets)]
    np.testing.assert_array_equal(sums, np.asarray(expected, dtype=dtype))


def test_a_history_items_cosines_do_not_depend_on_its_position_in_the_recent_history() -> None:
    """The cosine kernel takes history rows two at a time (an odd last one paired with itself):
    cos_hist_max, a max over the same products, must keep its bits when the recent items move."""
    catalog, emb, stats, _, histories, cands, vecs, nows = _random_case(4, 30, dim=72)
    cfg = CandidateConfig()
    checked = 0
    for h, c, v, t in zip(histories, cands, vecs, nows):
        if len(c) == 0 or len(h) < HISTORY_COS_ITEMS + 1:
            continue
        column = [_COSINE_COLUMNS[1]]  # cos_hist_max
        base = build_features(h, c, v, emb, catalog, stats, t, cfg)[:, column]
        tail = np.arange(len(h) - HISTORY_COS_ITEMS, len(h))
        for moved_tail in (tail[::-1], np.roll(tail, 1)):
            order = np.concatenate([np.arange(len(h) - HISTORY_COS_ITEMS), moved_tail])
            moved = UserHistory(h.items[order], h.timestamps, h.weights[order])
            np.testing.assert_array_equal(
                build_features(moved, c, v, emb, catalog, stats, t, cfg)[:, column], base
            )
            checked += 1
    assert checked >= 4
