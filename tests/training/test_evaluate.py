from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from training.baselines import CANDIDATE_SCHEMA, PopularityBaseline, RepeatThenPopular
from training.evaluate import (
    EvaluationError,
    EvaluationTable,
    evaluate_system,
    evaluate_systems,
    recommendations_matrix,
)
from training.metrics import PAD

DAY = 86_400
ITEMS = pl.DataFrame({"item_id": list("abcdef"), "title": [f"item {c}" for c in "abcdef"]})


def interactions(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "weight": [1.0] * len(rows),
        },
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "weight": pl.Float32},
    )


class FixedLists:
    """A system whose lists are given up front; records how the harness called it."""

    name = "fixed"

    def __init__(self, seen_lists: dict[str, list[str]], unseen_lists: dict[str, list[str]]) -> None:
        self.seen_lists = seen_lists
        self.unseen_lists = unseen_lists
        self.calls: list[tuple[list[str], int, bool]] = []

    def fit(self, train: pl.DataFrame, items: pl.DataFrame) -> None:
        self.fitted_rows = train.height

    def recommend(self, user_ids: list[str], k: int, exclude_seen: bool) -> pl.DataFrame:
        self.calls.append((list(user_ids), k, exclude_seen))
        source = self.unseen_lists if exclude_seen else self.seen_lists
        rows = [
            (u, item, r + 1, 1.0 / (r + 1), "fixed") for u in user_ids for r, item in enumerate(source[u][:k])
        ]
        return pl.DataFrame(rows, schema=CANDIDATE_SCHEMA, orient="row")


# u1 had "a" in train and buys "a" again plus "b" in test; u2 only repurchases "c"; u3 is new.
TRAIN = interactions([("u1", "a", 0), ("u2", "c", 0), ("u9", "f", 0)])
TEST = interactions([("u1", "a", DAY), ("u1", "b", DAY), ("u2", "c", DAY), ("u3", "d", DAY)])


def test_all_mode_counts_repurchases_and_novel_mode_excludes_seen_items() -> None:
    system = FixedLists(
        seen_lists={"u1": ["a", "e"], "u2": ["c", "e"], "u3": ["d", "e"]},
        unseen_lists={"u1": ["b", "e"], "u3": ["e", "d"]},
    )
    result = evaluate_system(system, TRAIN, TEST, ITEMS, ks=(1, 2))
    all_mode, novel = result["modes"]["all"], result["modes"]["novel"]
    # all: u1 held-out {a, b}, top-1 "a" hits -> recall 1/2; u2 {c} hit -> 1; u3 {d} hit -> 1.
    assert all_mode["users"] == 3
    assert all_mode["metrics"]["recall@1"] == pytest.approx((0.5 + 1 + 1) / 3)
    # novel: u1 held-out {b} (a was seen) -> top-1 "b" recall 1; u2 has nothing novel -> skipped;
    # u3 {d} at rank 2 -> recall@1 = 0, recall@2 = 1.
    assert novel["users"] == 2
    assert novel["metrics"]["recall@1"] == pytest.approx(0.5)
    assert novel["metrics"]["recall@2"] == pytest.approx(1.0)
    # The harness asked for exclude_seen only in novel mode, for max(ks) items, users sorted.
    assert system.calls == [(["u1", "u2", "u3"], 2, False), (["u1", "u3"], 2, True)]


def test_known_user_metrics_leave_out_users_without_train_history() -> None:
    system = FixedLists({"u1": ["a", "e"], "u2": ["e", "c"], "u3": ["d", "e"]}, {"u1": ["b"], "u3": ["d"]})
    result = evaluate_system(system, TRAIN, TEST, ITEMS, ks=(1,))
    # all mode, known users u1 (top-1 "a" of {a, b} -> 0.5) and u2 (top-1 "e" misses -> 0); u3 is new.
    assert result["modes"]["all"]["known_user_metrics"]["recall@1"] == pytest.approx(0.25)
    # Over everyone u3's hit counts too: (0.5 + 0 + 1) / 3.
    assert result["modes"]["all"]["metrics"]["recall@1"] == pytest.approx(0.5)
    # novel mode: u1 is the only known user with a novel item; "b" at rank 1.
    assert result["modes"]["novel"]["known_user_metrics"]["recall@1"] == pytest.approx(1.0)


def test_new_users_are_evaluated_and_counted() -> None:
    system = FixedLists({"u1": ["a"], "u2": ["c"], "u3": ["d"]}, {"u1": ["b"], "u3": ["d"]})
    result = evaluate_system(system, TRAIN, TEST, ITEMS, ks=(1,), modes=("all",))
    assert (result["modes"]["all"]["known_users"], result["modes"]["all"]["new_users"]) == (2, 1)


def test_cold_items_and_repeat_share_are_reported() -> None:
    system = FixedLists({"u1": ["a", "b"], "u2": ["e", "c"], "u3": ["d", "e"]}, {})
    metrics = evaluate_system(system, TRAIN, TEST, ITEMS, ks=(2,), modes=("all",))["modes"]["all"]["metrics"]
    # Cold held-out items (no train interaction): u1 {b}, u3 {d}; both found -> 1.0 over 2 users.
    assert metrics["cold_recall@2"] == pytest.approx(1.0)
    assert metrics["cold_users"] == 2
    # Slots holding an item the user had in train: u1 "a", u2 "c" -> 2 of 6 slots.
    assert metrics["repeat_share@2"] == pytest.approx(2 / 6)


def test_wall_time_is_fit_plus_recommend() -> None:
    result = evaluate_system(PopularityBaseline(), TRAIN, TEST, ITEMS, ks=(2,))
    modes_s = sum(m["recommend_s"] for m in result["modes"].values())
    assert result["wall_s"] == pytest.approx(result["fit_s"] + modes_s)
    assert result["fit_s"] > 0


def test_params_of_the_system_are_recorded() -> None:
    result = evaluate_system(RepeatThenPopular(repeat_half_life_days=2.5), TRAIN, TEST, ITEMS, ks=(2,))
    assert result["params"]["repeat_half_life_days"] == 2.5


def test_max_users_evaluates_a_seeded_sample() -> None:
    first = evaluate_system(PopularityBaseline(), TRAIN, TEST, ITEMS, ks=(2,), max_users=2, seed=3)
    again = evaluate_system(PopularityBaseline(), TRAIN, TEST, ITEMS, ks=(2,), max_users=2, seed=3)
    assert first["users"] == 2
    assert first["modes"]["all"]["metrics"] == again["modes"]["all"]["metrics"]


def test_unknown_mode_and_bad_k_are_rejected() -> None:
    with pytest.raises(EvaluationError, match="mode"):
        evaluate_system(PopularityBaseline(), TRAIN, TEST, ITEMS, modes=("recent",))
    with pytest.raises(EvaluationError, match="ks"):
        evaluate_system(PopularityBaseline(), TRAIN, TEST, ITEMS, ks=(0,))


def test_recommendations_matrix_orders_by_rank_and_dedupes() -> None:
    catalogue = ITEMS.select("item_id").with_row_index("item_idx")
    frame = pl.DataFrame(
        {"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["c", "a", "c", "b"], "rank": [2, 1, 3, 1]}
    )
    recs = recommendations_matrix(frame, ["u1", "u2", "u3"], catalogue, 3, "x")
    # u1: a (rank 1), c (rank 2; its rank-3 duplicate is dropped); u3 got nothing.
    assert recs.tolist() == [[0, 2, PAD], [1, PAD, PAD], [PAD, PAD, PAD]]


def test_recommending_items_outside_the_catalogue_is_an_error() -> None:
    catalogue = ITEMS.select("item_id").with_row_index("item_idx")
    frame = pl.DataFrame({"user_id": ["u1"], "item_id": ["zz"], "rank": [1]})
    with pytest.raises(EvaluationError, match=r"'x'.*not in the catalogue.*zz"):
        recommendations_matrix(frame, ["u1"], catalogue, 2, "x")


def test_frames_missing_columns_are_an_error() -> None:
    catalogue = ITEMS.select("item_id").with_row_index("item_idx")
    with pytest.raises(EvaluationError, match="rank"):
        recommendations_matrix(pl.DataFrame({"user_id": ["u1"], "item_id": ["a"]}), ["u1"], catalogue, 2, "x")


def test_evaluation_table_writes_json_markdown_and_console(tmp_path: Path) -> None:
    table = evaluate_systems(
        [PopularityBaseline(), RepeatThenPopular()], TRAIN, TEST, ITEMS, ks=(2, 4), protocol={"cutoff": DAY}
    )
    assert isinstance(table, EvaluationTable)
    data = json.loads(table.to_json(tmp_path / "out" / "m.json").read_text())
    assert [r["system"] for r in data["results"]] == ["popularity", "repeat_pop"]
    assert data["protocol"]["cutoff"] == DAY and data["protocol"]["ks"] == [2, 4]
    markdown = table.to_markdown().splitlines()
    assert markdown[0].startswith("| system | mode | users | map@2 |")
    assert len(markdown) == 2 + 4  # header, rule, 2 systems x 2 modes
    console = table.to_console().splitlines()
    assert console[0].split()[:3] == ["system", "mode", "users"]
    assert console[2].split()[:2] == ["popularity", "all"]
    # Known users only: u1 and u2 in all mode (u3 is new) -> user column 2.
    known = table.to_console("known_users").splitlines()
    assert known[2].split()[:3] == ["popularity", "all", "2"]


def test_json_writes_nan_as_null(tmp_path: Path) -> None:
    # No held-out item is cold here (u2 only repurchases), so cold recall is undefined.
    table = evaluate_systems(
        [PopularityBaseline()], TRAIN, TEST.filter(pl.col("user_id") == "u2"), ITEMS, ks=(2,)
    )
    assert math.isnan(table.results[0]["modes"]["all"]["metrics"]["cold_recall@2"])
    data = json.loads(table.to_json(tmp_path / "m.json").read_text())
    assert data["results"][0]["modes"]["all"]["metrics"]["cold_recall@2"] is None
