from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsvc.config import CandidateConfig
from recsvc.history import Event
from recsvc.recommender import (
    STAGES,
    RankingPolicy,
    Recommender,
    RecommendRequest,
    RecommendResult,
    UnknownItemError,
)
from tests.helpers.bundle_builder import build_loaded_bundle


@pytest.fixture(scope="module")
def bundle(synth_loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Shared read-only bundle (tests that record events build their own)."""
    return build_loaded_bundle(
        synth_loaded.interactions, synth_loaded.items, tmp_path_factory.mktemp("bundle")
    )


@pytest.fixture(scope="module")
def rec(bundle: Any) -> Recommender:
    return Recommender(bundle)


@pytest.fixture
def fresh_rec(synth_loaded: Any, tmp_path: Path) -> Recommender:
    return Recommender(build_loaded_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path))


def _busy_user(rec: Recommender) -> str:
    return max(rec.bundle.history.users(), key=lambda u: len(rec.bundle.history.get(u)))


def _ids(result: RecommendResult) -> list[str]:
    return [i.item_id for i in result.items]


def _comparable(result: RecommendResult) -> list[tuple[Any, ...]]:
    return [(i.item_id, i.score, i.sources, i.explanation) for i in result.items] + [
        (tuple(result.unknown_items), result.personalised, result.model_version)
    ]


def test_known_user_gets_k_distinct_personalised_items(rec: Recommender) -> None:
    result = rec.recommend(RecommendRequest(user_id=_busy_user(rec), k=10))
    assert len(result.items) == 10 and len(set(_ids(result))) == 10
    assert result.personalised and result.model_version == "test-bundle"
    assert [i.score for i in result.items] == sorted((i.score for i in result.items), reverse=True)


def test_timings_cover_every_stage(rec: Recommender) -> None:
    result = rec.recommend(RecommendRequest(user_id=_busy_user(rec), k=5))
    assert set(result.timings_ms) == set(STAGES)
    assert result.timings_ms["total"] >= result.timings_ms["features"] >= 0


def test_recommend_many_returns_exactly_what_recommend_returns(rec: Recommender) -> None:
    users = rec.bundle.history.users()[:25]  # > 20 queries: FAISS takes its BLAS path in the batch
    cat = rec.catalog
    reqs = [RecommendRequest(user_id=u, k=8, explain=True) for u in users]
    reqs += [
        RecommendRequest(user_id="cold-1", k=8),
        RecommendRequest(user_id="cold-2", k=8, session_items=(str(cat.item_ids[3]), "no-such-item")),
        RecommendRequest(user_id="cold-3", k=8, query="red running shoes"),
        RecommendRequest(
            user_id=users[0],
            k=8,
            include_attributes={"category": frozenset(cat.attribute_values["category"][:1])},
        ),
        RecommendRequest(
            user_id=users[1], k=8, repeat_policy="exclude", exclude_items=frozenset(cat.item_ids[:20])
        ),
    ]
    for policy in (RankingPolicy(), RankingPolicy(use_ranker=False, max_per_category=2)):
        batched = rec.recommend_many(reqs, policy)
        singles = [rec.recommend(r, policy) for r in reqs]
        assert [_comparable(b) for b in batched] == [_comparable(s) for s in singles]


def test_unknown_session_items_are_ignored_and_reported(rec: Recommender) -> None:
    known = str(rec.catalog.item_ids[5])
    result = rec.recommend(RecommendRequest(user_id="cold", k=5, session_items=("ghost-1", known, "ghost-2")))
    assert result.unknown_items == ["ghost-1", "ghost-2"]
    assert result.personalised and len(result.items) == 5


def test_session_items_steer_a_cold_user_towards_their_category(rec: Recommender) -> None:
    codes = rec.catalog.attributes["category"]
    seed = int(np.flatnonzero(codes == codes[0])[0])
    result = rec.recommend(
        RecommendRequest(user_id="cold", k=5, session_items=(str(rec.catalog.item_ids[seed]),)),
        RankingPolicy(use_ranker=False),
    )
    same = [codes[rec.catalog.index[i]] == codes[seed] for i in _ids(result)]
    assert sum(same) >= 4


def test_user_without_history_or_context_gets_popular_items(rec: Recommender) -> None:
    result = rec.recommend(RecommendRequest(user_id="stranger", k=5))
    assert not result.personalised
    assert all("popular" in i.sources for i in result.items)
    popular = {str(rec.catalog.item_ids[i]) for i in rec.bundle.item_stats.top_popular(50)}
    assert set(_ids(result)) <= popular


def test_user_without_history_or_context_gets_the_popularity_order(rec: Recommender) -> None:
    result = rec.recommend(RecommendRequest(user_id="stranger", k=5))
    expected = [str(rec.catalog.item_ids[i]) for i in rec.bundle.item_stats.top_popular(5)]
    assert _ids(result) == expected


def test_free_text_query_personalises_a_cold_user_via_the_bundle_encoder(rec: Recommender) -> None:
    result = rec.recommend(RecommendRequest(user_id="stranger", k=5, query="warm wool jacket"))
    assert result.personalised
    # the query is explicit intent: no popular-only filler while query candidates suffice
    assert all("query" in i.sources for i in result.items)


def test_warm_without_the_query_encoder_leaves_it_to_the_first_query(bundle: Any) -> None:
    cold = Recommender(bundle)
    cold.warm(query_encoder=False)
    assert cold._encoder is None
    result = cold.recommend(RecommendRequest(user_id="stranger", k=5, query="warm wool jacket"))
    assert cold._encoder is not None
    assert all("query" in i.sources for i in result.items)


def test_query_only_request_is_ordered_by_similarity_to_the_query(rec: Recommender) -> None:
    result = rec.recommend(RecommendRequest(user_id="stranger", k=5, query="warm wool jacket"))
    query_vec = rec._encode_query("warm wool jacket")
    sims = [float(rec.item_emb[rec.catalog.index[i.item_id]] @ query_vec) for i in result.items]
    scores = [i.score for i in result.items]
    np.testing.assert_allclose(scores, sims, atol=1e-5)  # the score IS the query similarity
    assert scores == sorted(scores, reverse=True)


def test_exclude_items_and_attribute_filters_are_hard_constraints(rec: Recommender) -> None:
    user = _busy_user(rec)
    cat = rec.catalog
    first = rec.recommend(RecommendRequest(user_id=user, k=10))
    brand = cat.attribute_values["brand"][0]
    result = rec.recommend(
        RecommendRequest(
            user_id=user,
            k=10,
            exclude_items=frozenset(_ids(first)[:5]),
            exclude_attributes={"brand": frozenset({brand})},
        )
    )
    assert not set(_ids(result)) & set(_ids(first)[:5])
    assert all(
        cat.attribute_values["brand"][cat.attributes["brand"][cat.index[i]]] != brand for i in _ids(result)
    )
    assert len(result.items) == 10


def test_selective_filters_still_fill_k_when_the_catalogue_allows(rec: Recommender) -> None:
    cat = rec.catalog
    codes = cat.attributes["category"]
    rare = int(np.argmin(np.bincount(codes[codes >= 0])))
    allowed = int((codes == rare).sum())
    value = cat.attribute_values["category"][rare]
    result = rec.recommend(
        RecommendRequest(
            user_id=_busy_user(rec), k=allowed, include_attributes={"category": frozenset({value})}
        )
    )
    assert len(result.items) == allowed
    assert all(codes[cat.index[i]] == rare for i in _ids(result))


def test_repeat_policy_exclude_drops_items_the_user_already_has(rec: Recommender) -> None:
    user = _busy_user(rec)
    had = {str(rec.catalog.item_ids[i]) for i in rec.bundle.history.get(user).items}
    result = rec.recommend(RecommendRequest(user_id=user, k=10, repeat_policy="exclude"))
    assert not set(_ids(result)) & had and len(result.items) == 10


def test_invalid_repeat_policy_and_k_are_rejected(rec: Recommender) -> None:
    with pytest.raises(ValueError, match="repeat_policy"):
        rec.recommend(RecommendRequest(user_id="u", repeat_policy="sometimes"))
    with pytest.raises(ValueError, match="k must be positive"):
        rec.recommend(RecommendRequest(user_id="u", k=0))


def test_without_ranker_items_are_ordered_by_cosine_to_the_user_vector(rec: Recommender) -> None:
    from recsvc.features import tower_inputs
    from recsvc.user_tower import user_vector

    user = _busy_user(rec)
    result = rec.recommend(RecommendRequest(user_id=user, k=10), RankingPolicy(use_ranker=False))
    emb, ages, w = tower_inputs(rec.bundle.history.get(user), rec.item_emb, rec.clock(), rec.history_len)
    vec = user_vector(rec.bundle.tower, emb, ages, w)
    cos = [float(rec.item_emb[rec.catalog.index[i]] @ vec) for i in _ids(result)]
    assert [i.score for i in result.items] == pytest.approx(cos, abs=1e-5)
    assert cos == sorted(cos, reverse=True)


def test_diversity_cap_limits_items_per_category(rec: Recommender) -> None:
    codes = rec.catalog.attributes["category"]
    result = rec.recommend(RecommendRequest(user_id=_busy_user(rec), k=5), RankingPolicy(max_per_category=1))
    cats = [codes[rec.catalog.index[i]] for i in _ids(result)]
    assert len(set(cats)) == len(cats) == 5


def test_diversity_cap_on_an_attribute_the_catalogue_lacks_is_ignored_with_a_warning(
    rec: Recommender, caplog: pytest.LogCaptureFixture
) -> None:
    req = RecommendRequest(user_id=_busy_user(rec), k=5)
    capped = rec.recommend(req, RankingPolicy(max_per_category=1, diversity_attribute="colour"))
    assert _ids(capped) == _ids(rec.recommend(req))
    assert "colour" in caplog.text


def test_explanations_name_another_history_item(rec: Recommender) -> None:
    user = _busy_user(rec)
    had = {str(rec.catalog.item_ids[i]) for i in rec.bundle.history.get(user).items}
    result = rec.recommend(RecommendRequest(user_id=user, k=5, explain=True))
    for item in result.items:
        assert item.explanation is not None
        if item.explanation.startswith("similar to "):
            named = item.explanation.removeprefix("similar to ")
            assert named in had and named != item.item_id


def test_similar_items_excludes_the_item_and_applies_filters(rec: Recommender) -> None:
    cat = rec.catalog
    item = str(cat.item_ids[0])
    result = rec.similar_items(item, 5)
    assert item not in _ids(result) and len(result.items) == 5
    same = cat.attributes["category"][0]
    value = cat.attribute_values["category"][same]
    other = rec.similar_items(item, 5, exclude_attributes={"category": frozenset({value})})
    assert all(cat.attributes["category"][cat.index[i]] != same for i in _ids(other))


def test_similar_items_of_unknown_item_raises_naming_it(rec: Recommender) -> None:
    with pytest.raises(UnknownItemError, match="nope"):
        rec.similar_items("nope", 5)


def test_recorded_events_are_seen_by_the_very_next_recommend(fresh_rec: Recommender) -> None:
    cat = fresh_rec.catalog
    item = str(cat.item_ids[7])
    ts = fresh_rec.clock() + 60
    before = float(fresh_rec.bundle.item_stats.counts[7, 0])
    fresh_rec.record_events([Event("newbie", item, "purchase", ts)])
    assert fresh_rec.bundle.history.get("newbie").items.tolist() == [7]
    assert fresh_rec.bundle.item_stats.counts[7, 0] == before + 8.0
    assert fresh_rec.clock() == ts
    result = fresh_rec.recommend(RecommendRequest(user_id="newbie", k=5, explain=True))
    assert result.personalised
    assert any(i.item_id == item for i in result.items) or all(
        i.explanation in (f"similar to {item}", "you had this before") for i in result.items
    )


def test_events_with_unknown_items_are_rejected_whole(fresh_rec: Recommender) -> None:
    item = str(fresh_rec.catalog.item_ids[1])
    with pytest.raises(UnknownItemError) as err:
        fresh_rec.record_events([Event("u", item, "view", 1), Event("u", "ghost", "view", 2)])
    assert err.value.item_ids == ["ghost"]
    assert len(fresh_rec.bundle.history.get("u")) == 0


def test_events_with_unknown_type_are_rejected(fresh_rec: Recommender) -> None:
    with pytest.raises(ValueError, match="'wishlist'"):
        fresh_rec.record_events([Event("u", str(fresh_rec.catalog.item_ids[1]), "wishlist", 1)])


def test_concurrent_recommends_and_events_do_not_fail(fresh_rec: Recommender) -> None:
    errors: list[BaseException] = []
    users = fresh_rec.bundle.history.users()[:20]
    items = [str(i) for i in fresh_rec.catalog.item_ids[:20]]

    def read() -> None:
        try:
            for u in users:
                assert len(fresh_rec.recommend(RecommendRequest(user_id=u, k=5)).items) == 5
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    def write() -> None:
        try:
            for j, u in enumerate(users):
                fresh_rec.record_events([Event(u, items[j], "click", fresh_rec.clock() + 1)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(3)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_when_filters_bite_ann_is_searched_inside_the_allowed_set(bundle: Any) -> None:
    # shallow ANN (10 of 200 items), no cf, so the category filter empties the first candidate list
    cfg = replace(
        bundle.config, candidates=CandidateConfig(ann=10, repeat=5, popular=5, cooccurrence=5, cf=0)
    )
    rec = Recommender(replace(bundle, config=cfg))
    cat = rec.catalog
    user = _busy_user(rec)
    codes = cat.attributes["category"]
    seen = set(codes[rec.bundle.history.get(user).items].tolist())
    unseen = [
        c for c in range(len(cat.attribute_values["category"])) if c not in seen and (codes == c).sum() >= 5
    ]
    assert unseen, "synthetic data should leave the user some unexplored category"
    value = cat.attribute_values["category"][unseen[0]]
    result = rec.recommend(
        RecommendRequest(user_id=user, k=5, include_attributes={"category": frozenset({value})}),
        RankingPolicy(use_ranker=False),
    )
    assert len(result.items) == 5
    assert all(codes[cat.index[i]] == unseen[0] for i in _ids(result))
    assert all("ann" in i.sources for i in result.items)


def test_a_bundle_published_and_loaded_from_disk_serves_the_same_items(
    synth_loaded: Any, tmp_path: Path, rec: Recommender
) -> None:
    from recsvc import bundle as bundle_mod
    from tests.helpers.bundle_builder import write_bundle

    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles")
    loaded = Recommender(bundle_mod.load(root))
    loaded.warm()
    for user in rec.bundle.history.users()[:5]:
        req = RecommendRequest(user_id=user, k=8)
        assert _ids(loaded.recommend(req)) == _ids(rec.recommend(req))


def test_users_with_history_get_collaborative_filtering_candidates(rec: Recommender) -> None:
    assert rec.bundle.cf is not None
    result = rec.recommend(RecommendRequest(user_id=_busy_user(rec), k=60))
    assert any("cf" in item.sources for item in result.items)


def test_a_bundle_without_factors_serves_without_the_cf_source(bundle: Any) -> None:
    plain = Recommender(replace(bundle, cf=None))
    user = _busy_user(plain)
    result = plain.recommend(RecommendRequest(user_id=user, k=60))
    assert len(result.items) == 60
    assert not any("cf" in item.sources for item in result.items)


@pytest.fixture(scope="module")
def cold_bundle(synth_loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A bundle trained without any event on one item in five: those items are never seen."""
    import polars as pl

    items = synth_loaded.items["item_id"].to_list()
    cold = set(items[::5])
    interactions = synth_loaded.interactions.filter(~pl.col("item_id").is_in(list(cold)))
    return build_loaded_bundle(interactions, synth_loaded.items, tmp_path_factory.mktemp("cold"))


def _cold_ids(rec: Recommender) -> set[str]:
    never = np.isnan(rec.bundle.item_stats.first_ts)
    return {str(i) for i in rec.catalog.item_ids[never]}


def test_never_seen_items_fill_the_reserved_slots_from_the_first_cold_position(cold_bundle: Any) -> None:
    from recsvc.config import RecommenderConfig

    plain = Recommender(cold_bundle, RecommenderConfig(cold_item_share=0.0))
    slotted = Recommender(cold_bundle, RecommenderConfig(cold_item_share=0.2, cold_first_position=3))
    cold = _cold_ids(plain)
    user = _busy_user(plain)
    before = _ids(plain.recommend(RecommendRequest(user_id=user, k=15)))
    after = _ids(slotted.recommend(RecommendRequest(user_id=user, k=15)))
    assert sum(i in cold for i in after) >= 3 > sum(i in cold for i in before[3:])
    assert after[:3] == before[:3]  # the head of the list is untouched
    warm_after = [i for i in after if i not in cold]
    assert warm_after == [i for i in before if i not in cold][: len(warm_after)]


def test_cold_slots_respect_filters_and_the_repeat_policy(cold_bundle: Any) -> None:
    from recsvc.config import RecommenderConfig

    rec = Recommender(cold_bundle, RecommenderConfig(cold_item_share=0.3, cold_first_position=0))
    cold = _cold_ids(rec)
    user = _busy_user(rec)
    cat = rec.catalog
    unfiltered = [i for i in _ids(rec.recommend(RecommendRequest(user_id=user, k=20))) if i in cold]
    brand = cat.attribute_values["brand"][cat.attributes["brand"][cat.index[unfiltered[0]]]]
    req = RecommendRequest(
        user_id=user,
        k=20,
        exclude_items=frozenset(unfiltered[1:3]),
        exclude_attributes={"brand": frozenset({brand})},
        repeat_policy="exclude",
    )
    result = _ids(rec.recommend(req))
    had = {str(cat.item_ids[i]) for i in rec.bundle.history.get(user).items}
    assert any(i in cold for i in result)
    assert not set(result) & (set(unfiltered[1:3]) | had)
    assert all(cat.attribute_values["brand"][cat.attributes["brand"][cat.index[i]]] != brand for i in result)
    assert [_comparable(r) for r in rec.recommend_many([req, req])] == [_comparable(rec.recommend(req))] * 2


def test_requests_excluding_owned_items_are_scored_by_the_novel_ranker(
    bundle: Any, synth_loaded: Any
) -> None:
    from tests.helpers.bundle_builder import train_small_ranker

    rng = np.random.default_rng(5)
    n = 400
    features = rng.normal(size=(n, bundle.ranker.n_features)).astype(np.float32)
    novel = train_small_ranker(features, rng.integers(0, 3, n), np.full(8, n // 8))
    plain, with_novel = Recommender(bundle), Recommender(replace(bundle, novel_ranker=novel))
    user = _busy_user(plain)
    allow = RecommendRequest(user_id=user, k=20)
    exclude = RecommendRequest(user_id=user, k=20, repeat_policy="exclude")
    assert _comparable(with_novel.recommend(allow)) == _comparable(plain.recommend(allow))
    assert _comparable(with_novel.recommend(exclude)) != _comparable(plain.recommend(exclude))
    mixed = with_novel.recommend_many([allow, exclude, allow])
    singles = [with_novel.recommend(r) for r in (allow, exclude, allow)]
    assert [_comparable(r) for r in mixed] == [_comparable(r) for r in singles]


def _no_ann_recommender(cold_bundle: Any, **config: Any) -> Recommender:
    """No ANN or cf source: the candidates (repeat, popular, co-occurrence) hold no never-seen item."""
    from recsvc.config import RecommenderConfig

    cands = CandidateConfig(ann=0, repeat=20, popular=20, cooccurrence=20, cf=0)
    settings = {"cold_item_share": 0.2, "cold_first_position": 3, **config}
    return Recommender(
        replace(cold_bundle, config=replace(cold_bundle.config, candidates=cands)),
        RecommenderConfig(**settings),
    )


def _best_cold(rec: Recommender, user: str, n: int, excluded: set[str] = frozenset()) -> list[str]:
    """The n never-seen items (not `excluded`) with the highest max cosine to the user's recent
    history items (the `cos_hist_max` window): what the slots should show."""
    from recsvc.features import HISTORY_COS_ITEMS

    recent = rec.item_emb[rec.bundle.history.get(user).items[-HISTORY_COS_ITEMS:]]
    cold = [
        i
        for i in np.flatnonzero(np.isnan(rec.bundle.item_stats.first_ts))
        if rec.catalog.item_ids[i] not in excluded
    ]
    best = sorted(cold, key=lambda i: (-float((recent @ rec.item_emb[i]).max()), i))[:n]
    return [str(rec.catalog.item_ids[i]) for i in best]


def test_cold_slots_are_filled_from_the_cold_pool_when_candidates_hold_no_cold_item(cold_bundle: Any) -> None:
    without_pool = _no_ann_recommender(cold_bundle, cold_pool=False)
    with_pool = _no_ann_recommender(cold_bundle)
    cold = _cold_ids(with_pool)
    user = _busy_user(with_pool)
    req = RecommendRequest(user_id=user, k=15)  # 3 slots, at positions 3, 7 and 11
    assert not cold & set(_ids(without_pool.recommend(req)))
    result = with_pool.recommend(req)
    placed = [(pos, item.item_id) for pos, item in enumerate(result.items) if item.item_id in cold]
    assert [pos for pos, _ in placed] == [3, 7, 11]
    assert {i for _, i in placed} == set(_best_cold(with_pool, user, 3))
    assert all(result.items[pos].sources == ("ann",) for pos, _ in placed)


def test_cold_pool_honours_exclusions_attribute_filters_and_the_repeat_policy(
    cold_bundle: Any,
) -> None:
    rec = _no_ann_recommender(cold_bundle)
    cat = rec.catalog
    user = _busy_user(rec)
    top = _best_cold(rec, user, 3)
    brand_of = {i: cat.attribute_values["brand"][cat.attributes["brand"][cat.index[i]]] for i in cat.item_ids}
    banned_brand = brand_of[top[1]]
    req = RecommendRequest(
        user_id=user,
        k=15,
        exclude_items=frozenset({top[0]}),
        exclude_attributes={"brand": frozenset({banned_brand})},
    )
    result = _ids(rec.recommend(req))
    banned = {top[0]} | {i for i in cat.item_ids if brand_of[i] == banned_brand}
    placed = [i for i in result if i in _cold_ids(rec)]
    assert placed and set(placed) == set(_best_cold(rec, user, 3, banned))
    assert not set(result) & banned
    # a never-seen item the shopper has in the session is theirs: excluded with the owned items
    owned = rec.recommend(replace(req, session_items=(top[2],), repeat_policy="exclude"))
    assert top[2] not in _ids(owned)
    assert sum(i in _cold_ids(rec) for i in _ids(owned)) == 3


def test_cold_pool_answers_are_the_same_in_recommend_and_recommend_many(cold_bundle: Any) -> None:
    from recsvc.cold_slots import cold_slot_count

    rec = _no_ann_recommender(cold_bundle)
    cat = rec.catalog
    users = rec.bundle.history.users()[:22]  # > 20 queries: FAISS takes its batch path
    reqs = [RecommendRequest(user_id=u, k=15) for u in users]
    reqs += [
        RecommendRequest(user_id="cold-3", k=15, query="red running shoes"),
        RecommendRequest(user_id=users[0], k=15, exclude_items=frozenset(_best_cold(rec, users[0], 4))),
        RecommendRequest(
            user_id=users[1],
            k=15,
            include_attributes={"category": frozenset(cat.attribute_values["category"][:2])},
        ),
    ]
    batched = rec.recommend_many(reqs)
    assert [_comparable(b) for b in batched] == [_comparable(rec.recommend(r)) for r in reqs]
    cold = _cold_ids(rec)
    slots = cold_slot_count(15, 0.2, 3)
    assert all(sum(i in cold for i in _ids(b)) == slots for b in batched[:22])


def test_result_columns_hold_the_same_answer_as_its_items(rec: Recommender) -> None:
    result = rec.recommend(RecommendRequest(user_id=_busy_user(rec), k=8, explain=True))
    cols = result.columns
    rebuilt = RecommendResult(result.items, result.model_version, [], True, {}).columns
    assert cols.item_ids.tolist() == _ids(result) == rebuilt.item_ids.tolist()
    assert cols.scores.tolist() == [i.score for i in result.items] == rebuilt.scores.tolist()
    assert cols.source_bits.tolist() == rebuilt.source_bits.tolist()
    assert cols.explanations == [i.explanation for i in result.items] == rebuilt.explanations


def test_result_needs_exactly_one_of_items_or_columns() -> None:
    with pytest.raises(ValueError, match="exactly one of items or columns"):
        RecommendResult(None, "v", [], False, {})
