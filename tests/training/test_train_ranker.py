from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import polars as pl
import pytest

from recsvc.candidates import SOURCE_BITS
from recsvc.catalog import Catalog
from recsvc.config import DAY, CandidateConfig, CollaborativeConfig
from recsvc.features import FEATURE_NAMES, feature_index
from tests.helpers.bundle_builder import EMBED_DIM, build_index, category_embeddings, untrained_tower
from training.train_ranker import (
    RankingDataset,
    build_ranking_dataset,
    grouped_ndcg,
    label_table,
    relevance_grades,
    state_at,
)


@pytest.fixture(scope="module")
def parts(synth_loaded: Any) -> dict[str, Any]:
    items = synth_loaded.items
    catalog = Catalog.from_items(items)
    emb = category_embeddings(items)
    from recsvc.config import TrainConfig

    return {
        "catalog": catalog,
        "item_emb": emb,
        "index": build_index(emb, TrainConfig()),
        "tower": untrained_tower(EMBED_DIM, 20),
        "cand_cfg": CandidateConfig(),
        "cf_cfg": CollaborativeConfig(),  # so the no-leakage tests cover the ALS fit and fold-in
    }


def _end(synth_loaded: Any) -> int:
    return int(synth_loaded.interactions["timestamp"].max()) + 1


def _dataset(
    data: pl.DataFrame, labels: pl.DataFrame, cutoff: int, end: int, parts: dict[str, Any], **kw: Any
) -> RankingDataset:
    return build_ranking_dataset(
        data, labels, cutoff=cutoff, label_end=end, max_users=kw.pop("max_users", 10_000), **parts, **kw
    )


def test_features_ignore_interactions_at_or_after_cutoff(synth_loaded: Any, parts: dict[str, Any]) -> None:
    """NO LEAKAGE: state and features for cutoff c are identical with or without rows >= c."""
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    cutoff = end - 2 * DAY
    past_only = inter.filter(pl.col("timestamp") < cutoff)
    with_future = _dataset(inter, inter, cutoff, end, parts)
    without_future = _dataset(past_only, inter, cutoff, end, parts)
    assert with_future.n_rows > 0
    np.testing.assert_array_equal(with_future.features, without_future.features)
    np.testing.assert_array_equal(with_future.items, without_future.items)
    np.testing.assert_array_equal(with_future.labels, without_future.labels)


def test_appending_far_future_rows_changes_nothing(synth_loaded: Any, parts: dict[str, Any]) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    cutoff = end - 2 * DAY
    future = inter.head(500).with_columns(pl.col("timestamp") + 30 * DAY, pl.col("weight") * 10)
    base = _dataset(inter, inter, cutoff, end, parts)
    extended = _dataset(pl.concat([inter, future]), inter, cutoff, end, parts)
    np.testing.assert_array_equal(base.features, extended.features)


def test_labels_are_the_strongest_event_weight_in_the_window(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    cutoff = end - 2 * DAY
    ds = _dataset(inter, inter, cutoff, end, parts)
    table = label_table(inter, parts["catalog"], cutoff, end)
    user = ds.user_ids[0]
    rows = slice(0, int(ds.groups[0]))
    expected = [table[user].get(int(i), 0.0) for i in ds.items[rows]]
    assert ds.labels[rows].tolist() == expected
    assert (ds.labels[rows] > 0).any()


def test_groups_partition_rows_and_every_kept_group_has_a_positive(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    ds = _dataset(inter, inter, end - 2 * DAY, end, parts)
    assert ds.groups.sum() == ds.n_rows == len(ds.features) == len(ds.items)
    assert ds.features.shape[1] == len(FEATURE_NAMES)
    bounds = np.concatenate([[0], np.cumsum(ds.groups)])
    assert all((ds.labels[a:b] > 0).any() for a, b in itertools.pairwise(bounds))


def test_max_users_samples_deterministically(synth_loaded: Any, parts: dict[str, Any]) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    a = _dataset(inter, inter, end - 2 * DAY, end, parts, max_users=20, drop_groups_without_positive=False)
    b = _dataset(inter, inter, end - 2 * DAY, end, parts, max_users=20, drop_groups_without_positive=False)
    assert len(a.user_ids) == 20 and a.user_ids == b.user_ids


def test_candidate_recall_is_reported_per_source_and_bounded(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    ds = _dataset(inter, inter, end - 2 * DAY, end, parts)
    assert set(ds.recall) == {"all", *SOURCE_BITS}
    assert 0 < ds.recall["all"] <= 1
    assert all(ds.recall[s] <= ds.recall["all"] + 1e-9 for s in SOURCE_BITS)
    assert ds.recall["ann"] > 0 and ds.recall["popular"] > 0


def test_state_at_uses_only_rows_before_the_cutoff(synth_loaded: Any, parts: dict[str, Any]) -> None:
    inter = synth_loaded.interactions
    cutoff = _end(synth_loaded) - 3 * DAY
    state = state_at(inter, parts["catalog"], cutoff, CandidateConfig())
    assert state.stats.counts[:, -1].sum() == pytest.approx(
        float(inter.filter(pl.col("timestamp") < cutoff)["weight"].sum()), rel=1e-5
    )
    assert all(int(state.history.get(u).timestamps.max()) < cutoff for u in state.history.users()[:50])


def test_state_at_popularity_sums_only_the_configured_window(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    cutoff = _end(synth_loaded) - 3 * DAY
    window = CandidateConfig().popularity_window_days
    state = state_at(inter, parts["catalog"], cutoff, CandidateConfig())
    recent = inter.filter((pl.col("timestamp") < cutoff) & (pl.col("timestamp") >= cutoff - window * DAY))
    older = inter.filter(pl.col("timestamp") < cutoff - window * DAY)
    assert older.height > 0  # the synthetic log is longer than the window, so the window matters
    assert state.stats.popularity.sum() == pytest.approx(float(recent["weight"].sum()), rel=1e-5)


def test_relevance_grades_map_event_weights_to_small_integers() -> None:
    assert relevance_grades(np.array([0.0, 1.0, 2.0, 4.0, 8.0, 0.5])).tolist() == [0, 1, 2, 3, 4, 1]


def test_train_ranker_trains_on_t2_window_and_validates_on_t1_window(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    from recsvc.config import RankerConfig, TrainConfig
    from training.train_ranker import train_ranker

    inter = synth_loaded.interactions
    t_end = _end(synth_loaded)
    t1, t2 = t_end - DAY, t_end - 2 * DAY
    cfg = TrainConfig(
        ranker=RankerConfig(num_leaves=7, min_data_in_leaf=5, num_boost_round=15, search_trials=1)
    )
    kwargs = {k: parts[k] for k in ("catalog", "item_emb", "index", "tower")}
    result = train_ranker(inter, t2=t2, t1=t1, t_end=t_end, config=cfg, **kwargs)
    assert result.train.cutoff == t2 and result.valid.cutoff == t1
    assert result.ranker.feature_names == list(FEATURE_NAMES)
    assert result.metrics["train_rows"] == result.train.n_rows > 0
    assert result.metrics["valid_candidate_recall"]["all"] > 0
    scores = result.ranker.predict(result.valid.features)
    assert scores.shape == (result.valid.n_rows,) and np.isfinite(scores).all()
    # rows at/after T never reach either set
    future = inter.head(300).with_columns(
        (pl.lit(t_end, dtype=pl.Int64) + pl.int_range(300)).alias("timestamp")
    )
    again = train_ranker(pl.concat([inter, future]), t2=t2, t1=t1, t_end=t_end, config=cfg, **kwargs)
    np.testing.assert_array_equal(again.valid.features, result.valid.features)
    np.testing.assert_array_equal(again.valid.labels, result.valid.labels)
    # the novel (owned items excluded) ranker ships only when it wins on its validation set
    novel = result.metrics["novel_valid_ndcg"]
    assert set(novel) == {"main", "novel"}
    assert result.metrics["novel_ranker_used"] == (novel["novel"] > novel["main"])
    assert (result.novel_ranker is not None) == result.metrics["novel_ranker_used"]


def test_train_ranker_without_training_labels_says_what_to_change(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    from recsvc.config import TrainConfig
    from training.train_ranker import train_ranker

    start = int(synth_loaded.interactions["timestamp"].min())
    kwargs = {k: parts[k] for k in ("catalog", "item_emb", "index", "tower")}
    with pytest.raises(ValueError, match="valid_days"):
        train_ranker(
            synth_loaded.interactions,
            t2=start - 2 * DAY,
            t1=start - DAY,
            t_end=start,
            config=TrainConfig(),
            **kwargs,
        )


def test_cf_candidates_and_features_are_built_from_the_past_only(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    ds = _dataset(inter, inter, end - 2 * DAY, end, parts)
    assert ds.recall["cf"] > 0
    assert (ds.sources & SOURCE_BITS["cf"]).any()
    cf_score = ds.features[:, feature_index("cf_score")]
    assert np.isfinite(cf_score).mean() > 0.5
    proposed = (ds.sources & SOURCE_BITS["cf"]) != 0
    assert np.isfinite(ds.features[proposed, feature_index("cf_rank")]).all()
    assert np.isnan(ds.features[~proposed, feature_index("cf_rank")]).all()


def test_without_cf_config_there_is_no_cf_source_and_cf_features_are_nan(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    ds = _dataset(inter, inter, end - 2 * DAY, end, {**parts, "cf_cfg": None})
    assert ds.recall["cf"] == 0
    assert np.isnan(ds.features[:, feature_index("cf_score")]).all()


def test_exclude_owned_removes_the_users_items_from_candidates_and_labels(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    cutoff = end - 2 * DAY
    ds = _dataset(inter, inter, cutoff, end, parts, exclude_owned=True)
    state = state_at(inter, parts["catalog"], cutoff, CandidateConfig())
    bounds = np.concatenate([[0], np.cumsum(ds.groups)])
    assert ds.n_rows > 0
    for user, a, b in zip(ds.user_ids, bounds[:-1], bounds[1:]):
        owned = set(state.history.get(user).items.tolist())
        assert not owned & set(ds.items[a:b].tolist())
        assert (ds.labels[a:b] > 0).any()
    assert ds.recall["repeat"] == 0


def test_grouped_ndcg_is_one_for_the_ideal_order_and_lower_otherwise() -> None:
    labels = np.array([8.0, 0.0, 1.0, 0.0, 0.0, 4.0])
    groups = np.array([3, 3])
    assert grouped_ndcg(np.array([3.0, 1.0, 2.0, 0.0, 1.0, 2.0]), labels, groups, 12) == pytest.approx(1.0)
    worst = grouped_ndcg(np.array([0.0, 2.0, 1.0, 2.0, 1.0, 0.0]), labels, groups, 12)
    # group 1: gains [15, 0, 1] ordered [0, 1, 15]; group 2: gain 7 at rank 3
    g1 = (1 / np.log2(3) + 15 / np.log2(4)) / (15 + 1 / np.log2(3))
    assert worst == pytest.approx((g1 + 1 / np.log2(4)) / 2)


def test_training_features_equal_what_the_serving_path_scores(synth_loaded: Any, tmp_path: Any) -> None:
    """OFFLINE == ONLINE: a ranking row at cutoff c gets the ranker score the Recommender gives the
    same item for the same user when its bundle state is at c (cf candidates and features included)."""
    from recsvc.config import RecommenderConfig, TrainConfig
    from recsvc.recommender import Recommender, RecommendRequest
    from tests.helpers.bundle_builder import build_loaded_bundle

    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    loaded = build_loaded_bundle(inter, synth_loaded.items, tmp_path)
    labels = inter.with_columns(pl.col("timestamp") + 3 * DAY)  # events "after" the bundle's end
    cfg = TrainConfig()
    ds = build_ranking_dataset(
        inter,
        labels,
        cutoff=end,
        label_end=None,
        catalog=loaded.catalog,
        item_emb=loaded.item_embeddings,
        index=loaded.index,
        tower=loaded.tower,
        cand_cfg=cfg.candidates,
        cf_cfg=cfg.collaborative,
        max_users=15,
        drop_groups_without_positive=False,
    )
    rec = Recommender(loaded, RecommenderConfig(cold_item_share=0.0))
    scores = loaded.ranker.predict(ds.features)
    bounds = np.concatenate([[0], np.cumsum(ds.groups)])
    checked = 0
    for user, a, b in zip(ds.user_ids, bounds[:-1], bounds[1:]):
        if b - a == 0 or len(loaded.history.get(user)) == 0:
            continue
        result = rec.recommend(RecommendRequest(user_id=user, k=int(b - a)))
        served = {i.item_id: i.score for i in result.items}
        ids = loaded.catalog.item_ids[ds.items[a:b]]
        assert served == pytest.approx(dict(zip(ids.tolist(), scores[a:b].tolist())), rel=1e-6)
        assert any("cf" in i.sources for i in result.items)
        checked += 1
    assert checked >= 10


def test_training_windows_step_back_one_width_and_keep_a_width_of_history() -> None:
    from training.train_ranker import training_windows

    assert training_windows(t2=100, t1=110, data_start=60, n=1) == [(100, 110)]
    assert training_windows(t2=100, t1=110, data_start=60, n=3) == [(100, 110), (90, 100), (80, 90)]
    # (70, 80) would leave 70 - 60 = 10 of history: allowed; (60, 70) would leave none
    assert training_windows(t2=100, t1=110, data_start=60, n=9)[-1] == (70, 80)
    with pytest.raises(ValueError, match="T2"):
        training_windows(t2=110, t1=110, data_start=0, n=2)


def test_training_windows_refuses_fewer_than_one_window() -> None:
    from training.train_ranker import training_windows

    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        training_windows(t2=100, t1=110, data_start=60, n=0)


def test_train_ranker_with_two_label_windows_trains_on_both(synth_loaded: Any, parts: dict[str, Any]) -> None:
    from recsvc.config import RankerConfig, TrainConfig
    from training.train_ranker import train_ranker

    inter = synth_loaded.interactions
    t_end = _end(synth_loaded)
    t1, t2 = t_end - DAY, t_end - 2 * DAY
    kwargs = {k: parts[k] for k in ("catalog", "item_emb", "index", "tower")}
    ranker_cfg = RankerConfig(
        num_leaves=7, min_data_in_leaf=5, num_boost_round=5, search_trials=1, novel_ranker=False
    )
    one = train_ranker(inter, t2=t2, t1=t1, t_end=t_end, config=TrainConfig(ranker=ranker_cfg), **kwargs)
    two_cfg = TrainConfig(ranker=RankerConfig(**{**ranker_cfg.__dict__, "train_label_windows": 2}))
    two = train_ranker(inter, t2=t2, t1=t1, t_end=t_end, config=two_cfg, **kwargs)
    earlier = _dataset(inter, inter, t2 - DAY, t2, parts)
    assert two.metrics["train_windows"] == [[t2, t1], [t2 - DAY, t2]]
    assert two.train.n_rows == one.train.n_rows + earlier.n_rows
    np.testing.assert_array_equal(two.train.features[: one.train.n_rows], one.train.features)
    np.testing.assert_array_equal(two.train.labels[one.train.n_rows :], earlier.labels)
    assert two.train.cutoff == t2


def test_a_prebuilt_state_gives_the_same_set_and_must_match_the_cutoff(
    synth_loaded: Any, parts: dict[str, Any]
) -> None:
    inter = synth_loaded.interactions
    end = _end(synth_loaded)
    cutoff = end - 2 * DAY
    state = state_at(inter, parts["catalog"], cutoff, parts["cand_cfg"], parts["cf_cfg"])
    built = _dataset(inter, inter, cutoff, end, parts)
    given = _dataset(inter, inter, cutoff, end, parts, state=state)
    np.testing.assert_array_equal(given.features, built.features)
    np.testing.assert_array_equal(given.labels, built.labels)
    with pytest.raises(ValueError, match="cutoff"):
        _dataset(inter, inter, cutoff - DAY, end, parts, state=state)
