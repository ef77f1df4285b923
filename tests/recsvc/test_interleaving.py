from __future__ import annotations

import random

import pytest

from recsvc import interleaving
from recsvc.interleaving import Credit, credit, team_draft


def _random_lists(rng: random.Random, n: int = 15) -> tuple[list[str], list[str]]:
    pool = [f"i{j}" for j in range(25)]
    return rng.sample(pool, n), rng.sample(pool, n)


def test_team_draft_every_prefix_holds_the_top_items_of_both_teams() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a, b = _random_lists(rng)
        out = team_draft(a, b, 10, rng)
        for m in range(1, len(out) + 1):
            prefix = out[:m]
            shown = {item for item, _ in prefix}
            ka = sum(1 for _, o in prefix if o == "a")
            kb = m - ka
            assert set(a[:ka]) <= shown
            assert set(b[:kb]) <= shown
            assert abs(ka - kb) <= 1


def test_team_draft_has_no_duplicates_and_origins_name_the_list_that_drafted() -> None:
    rng = random.Random(1)
    for _ in range(200):
        a, b = _random_lists(rng)
        out = team_draft(a, b, 12, rng, origins=("control", "treatment"))
        items = [item for item, _ in out]
        assert len(items) == len(set(items)) == 12
        for item, origin in out:
            assert item in (a if origin == "control" else b)


def test_team_draft_fills_from_the_other_list_when_one_runs_out() -> None:
    out = team_draft(["x"], ["y", "z", "w"], 4, random.Random(3))
    assert sorted(item for item, _ in out) == ["w", "x", "y", "z"]
    assert dict(out)["x"] == "a"
    assert dict(out)["w"] == "b"


def test_team_draft_stops_at_the_union_of_both_lists() -> None:
    assert len(team_draft(["x", "y"], ["y", "x"], 10, random.Random(0))) == 2


def test_team_draft_rejects_identical_team_names() -> None:
    with pytest.raises(ValueError, match="different origin names"):
        team_draft(["x"], ["y"], 2, random.Random(0), origins=("v", "v"))


def test_team_draft_first_pick_is_a_fair_coin() -> None:
    rng = random.Random(7)
    n = 4000
    first_a = sum(team_draft(["p", "q"], ["p", "q"], 2, rng)[0][1] == "a" for _ in range(n))
    # binomial(4000, 0.5): sd = 31.6; 4 sd bounds
    assert abs(first_a - n / 2) < 4 * 31.7


def test_random_clicks_favour_neither_team() -> None:
    rng = random.Random(11)
    total = Credit(0, 0, 0)
    for _ in range(3000):
        a, b = _random_lists(rng)
        out = team_draft(a, b, 10, rng)
        clicked = [item for item, _ in out if rng.random() < 0.15]
        c = credit(out, clicked)
        total = Credit(total.wins_a + c.wins_a, total.wins_b + c.wins_b, total.ties + c.ties)
    assert interleaving.preference_test(total).p_value > 0.001
    assert abs(interleaving.preference(total)) < 0.05


def test_clicks_on_the_better_rankers_items_make_it_win() -> None:
    rng = random.Random(5)
    credits = []
    for _ in range(300):
        a, b = _random_lists(rng)
        relevant = set(a[:3])  # the user wants exactly what ranker A puts first
        out = team_draft(a, b, 10, rng)
        credits.append(credit(out, [item for item, _ in out if item in relevant]))
    total = interleaving.total_credit(credits)
    test = interleaving.preference_test(total)
    assert total.wins_a > total.wins_b
    assert test.preference > 0
    assert test.p_value < 1e-6


def test_credit_counts_clicks_per_team() -> None:
    shown = [("x", "a"), ("y", "b"), ("z", "a"), ("w", "b")]
    assert credit(shown, ["x", "z", "y"]) == Credit(1, 0, 0)
    assert credit(shown, ["y"]) == Credit(0, 1, 0)
    assert credit(shown, ["x", "w"]) == Credit(0, 0, 1)


def test_credit_ignores_clicks_on_items_that_were_not_shown() -> None:
    assert credit([("x", "a"), ("y", "b")], ["not-shown"]) == Credit(0, 0, 0)


def test_total_credit_sums_impressions() -> None:
    assert interleaving.total_credit([Credit(1, 0, 0), Credit(0, 0, 1), Credit(1, 0, 0)]) == Credit(2, 0, 1)
