from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsvc.config import DAY, BaselineConfig
from training.baselines import (
    CANDIDATE_SCHEMA,
    ALSBaseline,
    CandidateGenerator,
    ItemKNN,
    PopularityBaseline,
    RepeatThenPopular,
    cooccurrence_similarity,
    decay,
    fill_with_popular,
    grid_points,
    make_baseline,
    popularity_order,
    top_k_per_row,
    tune,
)
from training.data import Dataset
from training.evaluate import evaluate_system
from training.metrics import PAD
from training.split import holdout_cutoff, time_split

T0 = 1_700_000_000


def frame(rows: list[tuple[str, str, int, float]]) -> pl.DataFrame:
    """Interactions in the canonical column order (user, item, timestamp, weight)."""
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "weight": [r[3] for r in rows],
        },
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "weight": pl.Float32},
    )


def catalogue(names: str) -> pl.DataFrame:
    return pl.DataFrame({"item_id": list(names), "title": [f"item {n}" for n in names]})


def lists(recs: pl.DataFrame) -> dict[str, list[str]]:
    ordered = recs.sort("user_id", "rank")
    return {u: g["item_id"].to_list() for (u,), g in ordered.group_by("user_id", maintain_order=True)}


# ---- pure helpers -------------------------------------------------------------------------


def test_decay_halves_per_half_life() -> None:
    assert decay(np.array([0, 2 * DAY, 4 * DAY]), 2.0) == pytest.approx([1.0, 0.5, 0.25])


def test_top_k_per_row_orders_by_score_and_pads() -> None:
    m = sp.csr_matrix(np.array([[0.0, 3.0, 1.0, 2.0], [0.0, 0.0, 5.0, 0.0]], dtype=np.float32))
    items, scores = top_k_per_row(m, 2)
    # Row 0: columns 1 (3.0) then 3 (2.0); row 1 has one entry, the second slot is padding.
    assert items.tolist() == [[1, 3], [2, PAD]]
    assert scores[0].tolist() == [3.0, 2.0]
    assert scores[1, 1] == -np.inf


def test_popularity_order_counts_window_weight_then_all_time() -> None:
    # Items 0..3; window of 1 day before end=10*DAY: only events after 9*DAY count as recent.
    item = np.array([0, 0, 0, 1, 2, 2])
    ts = np.array([1, 2, 3, 10, 10, 10]) * DAY
    w = np.array([1, 1, 1, 4, 1, 1], dtype=np.float32)
    order, recent = popularity_order(item, ts, w, 4, end_ts=10 * DAY, window_days=1.0)
    # Recent: item1=4, item2=2, item0=0 (all-time 3), item3=0 (all-time 0).
    assert order.tolist() == [1, 2, 0, 3]
    assert recent.tolist() == [0.0, 4.0, 2.0, 0.0]


def test_fill_with_popular_keeps_personal_first_and_skips_listed_and_blocked() -> None:
    personal = np.array([[4, PAD], [PAD, PAD]])
    personal_scores = np.array([[9.0, -np.inf], [-np.inf, -np.inf]], dtype=np.float32)
    popular = np.array([0, 4, 1, 2, 3])
    popular_scores = np.array([5, 3, 2, 1, 4], dtype=np.float32)
    blocked = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32))
    items, scores, is_personal = fill_with_popular(
        personal, personal_scores, popular, popular_scores, 3, blocked, 5
    )
    # Row 0: personal 4, then popular order 0 (blocked), 4 (already listed), 1, 2.
    # Row 1: just the popular order.
    assert items.tolist() == [[4, 1, 2], [0, 4, 1]]
    assert is_personal.tolist() == [[True, False, False], [False, False, False]]
    assert scores[0].tolist() == [9.0, 3.0, 2.0]


def test_cooccurrence_similarity_is_cosine_without_diagonal() -> None:
    # Users: u0 bought {0, 1}, u1 bought {0, 1}, u2 bought {0, 2}.
    m = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1]], dtype=np.float32))
    sim = cooccurrence_similarity(m, neighbours=5).toarray()
    # cos(0,1) = 2 / sqrt(3 * 2); cos(0,2) = 1 / sqrt(3 * 1); cos(1,2) = 0.
    assert sim[0, 1] == pytest.approx(2 / np.sqrt(6))
    assert sim[0, 2] == pytest.approx(1 / np.sqrt(3))
    assert sim[1, 2] == 0.0
    assert np.diag(sim).tolist() == [0.0, 0.0, 0.0]


def test_cooccurrence_similarity_keeps_only_top_neighbours() -> None:
    m = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1]], dtype=np.float32))
    sim = cooccurrence_similarity(m, neighbours=1).toarray()
    assert (sim > 0).sum(axis=1).tolist() == [1, 1, 1]
    assert sim[0].argmax() == 1  # item 1 is item 0's closest neighbour


def test_grid_points_is_the_cartesian_product() -> None:
    points = grid_points({"b": [1, 2], "a": ["x"]})
    assert points == [{"a": "x", "b": 1}, {"a": "x", "b": 2}]
    assert grid_points({}) == [{}]


# ---- baselines on hand-built data -----------------------------------------------------------

ITEMS = catalogue("abcdef")
TRAIN = frame(
    [
        ("u1", "a", T0, 1.0),
        ("u1", "b", T0 + DAY, 1.0),
        ("u2", "a", T0 + DAY, 1.0),
        ("u2", "b", T0 + DAY, 1.0),
        ("u3", "c", T0 + 2 * DAY, 1.0),
        ("u3", "c", T0 + 2 * DAY, 1.0),
        ("u3", "d", T0 + 2 * DAY, 1.0),
        ("u4", "a", T0 + 3 * DAY, 1.0),
        ("u5", "e", T0, 8.0),
    ]
)


def test_every_baseline_satisfies_the_protocol_and_schema() -> None:
    for name in ("popularity", "repeat_pop", "itemknn", "als"):
        system = make_baseline(name, factors=4, iterations=2) if name == "als" else make_baseline(name)
        assert isinstance(system, CandidateGenerator)
        system.fit(TRAIN, ITEMS)
        recs = system.recommend(["u1", "nobody"], 4, exclude_seen=False)
        assert dict(recs.schema) == CANDIDATE_SCHEMA
        assert recs.group_by("user_id").agg(pl.col("rank").sort())["rank"].to_list() == [[1, 2, 3, 4]] * 2


def test_popularity_ranks_by_recent_weight_for_everyone() -> None:
    system = PopularityBaseline(popularity_window_days=7.0)
    system.fit(TRAIN, ITEMS)
    got = lists(system.recommend(["u1", "nobody"], 3, exclude_seen=False))
    # Weights: a=3, b=2, c=2, d=1, e=8 -> e, a, then b/c tie broken by all-time (equal) then catalogue order.
    assert got == {"u1": ["e", "a", "b"], "nobody": ["e", "a", "b"]}


def test_popularity_window_ignores_old_events() -> None:
    system = PopularityBaseline(popularity_window_days=1.0)
    system.fit(TRAIN, ITEMS)
    # end = T0 + 3 days; only u4's "a" is within the last day; then all-time order e(8), a, b, c...
    assert lists(system.recommend(["x"], 2, exclude_seen=False)) == {"x": ["a", "e"]}


def test_exclude_seen_removes_the_users_items() -> None:
    system = PopularityBaseline()
    system.fit(TRAIN, ITEMS)
    got = lists(system.recommend(["u1"], 4, exclude_seen=True))["u1"]
    assert "a" not in got and "b" not in got
    assert got == ["e", "c", "d", "f"]


def test_repeat_pop_lists_own_items_by_recency_weighted_count_first() -> None:
    system = RepeatThenPopular(repeat_half_life_days=1.0)
    system.fit(TRAIN, ITEMS)
    recs = system.recommend(["u3", "u1"], 3, exclude_seen=False)
    got = lists(recs)
    # end = T0 + 3 days. u3: c twice at 1 day old (2 * 0.5 = 1.0) beats d once (0.5); then popular e.
    assert got["u3"] == ["c", "d", "e"]
    # u1: b (2 days old: 0.25) beats a (3 days old: 0.125); then e.
    assert got["u1"] == ["b", "a", "e"]
    assert recs.filter(pl.col("user_id") == "u3")["sources"].to_list() == ["repeat", "repeat", "popular"]


def test_itemknn_recommends_co_purchased_items() -> None:
    system = ItemKNN(neighbours=10)
    system.fit(TRAIN, ITEMS)
    # u4 bought only "a"; "b" is co-purchased with "a" by u1 and u2.
    first = system.recommend(["u4"], 3, exclude_seen=True).filter(pl.col("rank") == 1)
    assert first["item_id"].to_list() == ["b"]
    assert first["sources"].to_list() == ["itemknn"]


def test_itemknn_unknown_user_gets_popularity() -> None:
    knn, pop = ItemKNN(), PopularityBaseline()
    knn.fit(TRAIN, ITEMS)
    pop.fit(TRAIN, ITEMS)
    assert lists(knn.recommend(["new"], 4, False)) == lists(pop.recommend(["new"], 4, False))


def test_als_returns_k_distinct_unseen_items_per_user() -> None:
    system = ALSBaseline(factors=4, iterations=3, threads=1)
    system.fit(TRAIN, ITEMS)
    got = lists(system.recommend(["u1", "u3", "new"], 4, exclude_seen=True))
    assert {u: len(set(v)) for u, v in got.items()} == {"u1": 4, "u3": 4, "new": 4}
    assert not {"a", "b"} & set(got["u1"])
    assert not {"c", "d"} & set(got["u3"])


def test_recommend_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PopularityBaseline().recommend(["u1"], 3, exclude_seen=False)


def test_train_items_outside_catalogue_are_named() -> None:
    with pytest.raises(ValueError, match=r"missing from the catalogue.*zz"):
        PopularityBaseline().fit(frame([("u1", "zz", T0, 1.0)]), ITEMS)


def test_make_baseline_rejects_unknown_parameters_and_names() -> None:
    with pytest.raises(ValueError, match="no parameter"):
        make_baseline("itemknn", BaselineConfig(), factors=3)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("bpr")


def test_batches_give_the_same_answer_as_one_pass() -> None:
    small, big = ItemKNN(batch_users=2), ItemKNN(batch_users=100)
    small.fit(TRAIN, ITEMS)
    big.fit(TRAIN, ITEMS)
    users = ["u1", "u2", "u3", "u4", "u5", "new"]
    assert small.recommend(users, 5, True).equals(big.recommend(users, 5, True))


# ---- synthetic data with co-purchase structure -------------------------------------------


@pytest.fixture(scope="module")
def synth_split(synth_loaded: Dataset) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    split = time_split(synth_loaded.interactions, holdout_cutoff(synth_loaded.interactions, 2.0))
    return split.train, split.test, synth_loaded.items


def test_itemknn_beats_popularity_on_new_items_for_the_user(synth_split) -> None:
    train, test, items = synth_split
    scores = {
        system.name: evaluate_system(system, train, test, items, ks=(10,), modes=("novel",))["modes"][
            "novel"
        ]["metrics"]["recall@10"]
        for system in (PopularityBaseline(), ItemKNN())
    }
    assert scores["itemknn"] > scores["popularity"] * 1.3


def test_als_returns_k_items_for_every_test_user(synth_split) -> None:
    train, test, items = synth_split
    users = test["user_id"].unique().sort().to_list()
    system = ALSBaseline(factors=16, iterations=5, threads=1)
    system.fit(train, items)
    recs = system.recommend(users, 20, exclude_seen=False)
    counts = recs.group_by("user_id").agg(pl.col("item_id").n_unique().alias("n"))
    assert counts.height == len(users)
    assert counts["n"].to_list() == [20] * len(users)


def test_tune_picks_the_best_trial_on_the_validation_window(synth_split) -> None:
    train, _, items = synth_split
    result = tune(
        lambda **p: PopularityBaseline(**p),
        {"popularity_window_days": [0.5, 3.0, 14.0]},
        train,
        items,
        valid_days=2.0,
        metric="recall@10",
    )
    assert len(result.trials) == 3
    assert result.score == max(score for _, score in result.trials)
    assert result.params in [p for p, _ in result.trials]
    # The validation window is cut from train, so it ends before the test period starts.
    assert result.cutoff == holdout_cutoff(train, 2.0) < int(train["timestamp"].max()) + 1
