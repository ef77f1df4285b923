"""Team-draft interleaving (Radlinski, Kurup & Joachims, 2008) and click credit.

Interleaving shows one list built from two rankers to the same user, so each impression is a
paired comparison; it needs far fewer users than a split A/B test to detect a preference.
Every shown item carries the name of the team (ranker) that drafted it; clicks are credited to
the team, and the impression is won by the team with more clicked items.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from recsvc.ab_stats import PreferenceTest, preference_score, sign_test

ORIGIN_A = "a"
ORIGIN_B = "b"


def team_draft(
    list_a: Sequence[str],
    list_b: Sequence[str],
    k: int,
    rng: random.Random,
    *,
    origins: tuple[str, str] = (ORIGIN_A, ORIGIN_B),
) -> list[tuple[str, str]]:
    """Interleave two rankings into at most `k` unique items tagged with the drafting team.

    Each round, the team with fewer picks drafts next (a coin flip breaks ties) and takes its
    highest-ranked item not yet shown. So every prefix holds the top items of both lists and
    neither ranker is favoured by position. `origins` names the teams (e.g. variant names).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if origins[0] == origins[1]:
        raise ValueError(f"the two teams need different origin names, got {origins!r}")
    shown: set[str] = set()
    result: list[tuple[str, str]] = []
    picks = [0, 0]
    cursors = [0, 0]
    lists = (list_a, list_b)

    def next_unshown(team: int) -> str | None:
        ranking = lists[team]
        while cursors[team] < len(ranking) and ranking[cursors[team]] in shown:
            cursors[team] += 1
        return ranking[cursors[team]] if cursors[team] < len(ranking) else None

    while len(result) < k:
        heads = (next_unshown(0), next_unshown(1))
        if heads[0] is None and heads[1] is None:
            break
        if heads[0] is None:
            team = 1
        elif heads[1] is None:
            team = 0
        elif picks[0] != picks[1]:
            team = 0 if picks[0] < picks[1] else 1
        else:
            team = 0 if rng.random() < 0.5 else 1
        item = heads[team]
        assert item is not None
        shown.add(item)
        picks[team] += 1
        result.append((item, origins[team]))
    return result


class Credit(NamedTuple):
    """Outcome of one impression: exactly one field is 1 when something was clicked, else all 0."""

    wins_a: int
    wins_b: int
    ties: int


def credit(
    interleaved: Sequence[tuple[str, str]],
    clicked_items: Iterable[str],
    *,
    origins: tuple[str, str] = (ORIGIN_A, ORIGIN_B),
) -> Credit:
    """Who won this impression: the team whose drafted items got more clicks.

    Clicks on items that were not shown are ignored; an impression without clicks on shown
    items is no evidence either way and scores (0, 0, 0).
    """
    team_of = dict(interleaved)
    clicked = set(clicked_items)
    clicks_a = sum(1 for item in clicked if team_of.get(item) == origins[0])
    clicks_b = sum(1 for item in clicked if team_of.get(item) == origins[1])
    if clicks_a == 0 and clicks_b == 0:
        return Credit(0, 0, 0)
    if clicks_a > clicks_b:
        return Credit(1, 0, 0)
    if clicks_b > clicks_a:
        return Credit(0, 1, 0)
    return Credit(0, 0, 1)


def total_credit(credits: Iterable[Credit]) -> Credit:
    """Sum impression outcomes."""
    wa = wb = t = 0
    for c in credits:
        wa += c.wins_a
        wb += c.wins_b
        t += c.ties
    return Credit(wa, wb, t)


def preference(c: Credit) -> float:
    """Δ_AB for summed credit (> 0 favours team A); see `ab_stats.preference_score`."""
    return preference_score(c.wins_a, c.wins_b, c.ties)


def preference_test(c: Credit) -> PreferenceTest:
    """Preference plus the exact sign test that it is not chance."""
    return sign_test(c.wins_a, c.wins_b, c.ties)
