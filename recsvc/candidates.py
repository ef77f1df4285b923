"""Candidate generation: a union of cheap sources that the ranker then orders.

ANN search itself happens outside (so recsvc-batch can run one batched FAISS search); this module
turns its result plus the user's own history, popularity and co-occurrence into one deduplicated
list with a bitmask of which sources proposed each item.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsvc.behaviour import CoOccurrence, ItemStats, decay
from recsvc.candidate_kernels import generate_block, item_slots
from recsvc.config import CandidateConfig
from recsvc.history import HistoryRows, UserHistory

SOURCE_BITS: dict[str, int] = {
    "ann": 1,
    "repeat": 2,
    "popular": 4,
    "cooc": 8,
    "session": 16,
    "query": 32,
    "cf": 64,
}
SOURCE_NAMES: tuple[str, ...] = tuple(SOURCE_BITS)
# Source names of every possible bitmask, so naming a candidate's sources is one tuple lookup.
NAMES_BY_BITS: tuple[tuple[str, ...], ...] = tuple(
    tuple(name for name, bit in SOURCE_BITS.items() if bits & bit) for bits in range(2 ** len(SOURCE_BITS))
)
BITS_BY_NAMES: dict[tuple[str, ...], int] = {names: bits for bits, names in enumerate(NAMES_BY_BITS)}
# Order in which sources are kept when the union exceeds max_candidates (most specific first).
SOURCE_PRIORITY: tuple[str, ...] = ("session", "query", "repeat", "ann", "cf", "cooc", "popular")
# Recent history items whose co-occurrence neighbours are proposed.
COOC_RECENT_ITEMS = 20


@dataclass(frozen=True)
class SourceList:
    """One source's proposal: items best first with that source's score."""

    source: str
    items: np.ndarray  # int32
    scores: np.ndarray  # float32

    def __post_init__(self) -> None:
        if self.source not in SOURCE_BITS:
            raise ValueError(f"unknown candidate source {self.source!r} (known: {', '.join(SOURCE_NAMES)})")


@dataclass(frozen=True)
class Candidates:
    """Deduplicated candidates for one user, with per-source evidence used as ranker features."""

    items: np.ndarray  # int32 [n]
    sources: np.ndarray  # uint8 [n] bitmask of SOURCE_BITS
    ann_score: np.ndarray  # float32 [n], nan when not proposed by ANN
    ann_rank: np.ndarray  # float32 [n], 0-based, nan when not proposed by ANN
    cooc_score: np.ndarray  # float32 [n], summed decayed co-occurrence, nan when not proposed
    repeat_score: np.ndarray  # float32 [n], recency-weighted own count, nan when not proposed
    cf_rank: np.ndarray  # float32 [n], 0-based rank in the cf (ALS) list, nan when not proposed

    def __len__(self) -> int:
        return len(self.items)

    def has(self, source: str) -> np.ndarray:
        """Boolean mask of candidates proposed by `source`."""
        return (self.sources & SOURCE_BITS[source]) != 0

    def source_names(self, i: int) -> tuple[str, ...]:
        """Names of the sources that proposed candidate `i`."""
        return NAMES_BY_BITS[int(self.sources[i])]

    def take(self, keep: np.ndarray) -> Candidates:
        """Subset by boolean mask or index array (filters keep evidence aligned)."""
        return Candidates(
            self.items[keep],
            self.sources[keep],
            self.ann_score[keep],
            self.ann_rank[keep],
            self.cooc_score[keep],
            self.repeat_score[keep],
            self.cf_rank[keep],
        )

    @staticmethod
    def empty() -> Candidates:
        f = np.zeros(0, np.float32)
        return Candidates(np.zeros(0, np.int32), np.zeros(0, np.uint8), f, f, f, f, f)


def focus_on_query(cands: Candidates, min_keep: int) -> Candidates:
    """A free-text query is explicit intent: drop items that only popularity proposed.

    The ranker learned from traffic without queries, where popularity features dominate for users
    without history, so popular-only items would otherwise outrank what the shopper typed. They
    stay when fewer than `min_keep` other candidates exist, so k results still come back.
    """
    keep = cands.sources != SOURCE_BITS["popular"]
    return cands.take(keep) if int(keep.sum()) >= min_keep else cands


def merge(lists: Sequence[SourceList], max_candidates: int) -> Candidates:
    """Union of source lists: one row per item, OR of source bits, per-source scores kept.

    Items keep the position of their first appearance in SOURCE_PRIORITY order, so truncation to
    `max_candidates` drops the least specific proposals (popular last).
    """
    ordered = sorted(lists, key=lambda s: SOURCE_PRIORITY.index(s.source))
    if not ordered or sum(len(s.items) for s in ordered) == 0:
        return Candidates.empty()
    all_items = np.concatenate([np.asarray(s.items, dtype=np.int32) for s in ordered])
    unique, first, inverse = np.unique(all_items, return_index=True, return_inverse=True)
    sources = np.zeros(len(unique), np.uint8)
    evidence = {
        name: np.full(len(unique), np.nan, np.float32)
        for name in ("ann", "ann_rank", "cooc", "repeat", "cf_rank")
    }
    offset = 0
    for s in ordered:
        rows = inverse[offset : offset + len(s.items)]
        offset += len(s.items)
        # one bit per source: a repeated row within a list sets the same bit (no unbuffered .at needed)
        sources[rows] |= SOURCE_BITS[s.source]
        if s.source == "ann":
            evidence["ann"][rows] = s.scores
            evidence["ann_rank"][rows] = np.arange(len(rows), dtype=np.float32)
        elif s.source == "cooc":
            evidence["cooc"][rows] = s.scores
        elif s.source == "repeat":
            evidence["repeat"][rows] = s.scores
        elif s.source == "cf":
            evidence["cf_rank"][rows] = np.arange(len(rows), dtype=np.float32)
    order = np.argsort(first, kind="stable")[:max_candidates]
    return Candidates(
        unique[order].astype(np.int32),
        sources[order],
        evidence["ann"][order],
        evidence["ann_rank"][order],
        evidence["cooc"][order],
        evidence["repeat"][order],
        evidence["cf_rank"][order],
    )


def popular_source(stats: ItemStats, n: int) -> SourceList:
    """Items with the most recent interactions (the cold-start fallback)."""
    items = stats.top_popular(n)
    return SourceList("popular", items, stats.popularity[items])


def cooc_source(
    seed_items: np.ndarray,
    seed_weights: np.ndarray,
    cooc: CoOccurrence,
    n: int,
    source: str = "cooc",
) -> SourceList:
    """Neighbours of seed items, each neighbour scored by sum(seed weight x similarity)."""
    if len(seed_items) == 0 or n <= 0:
        return SourceList(source, np.zeros(0, np.int32), np.zeros(0, np.float32))
    lo = cooc.indptr[seed_items]
    hi = cooc.indptr[np.asarray(seed_items) + 1]
    lengths = hi - lo
    if lengths.sum() == 0:
        return SourceList(source, np.zeros(0, np.int32), np.zeros(0, np.float32))
    # every seed's CSR row lo..hi-1, concatenated, without a Python loop over seeds
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum())) + np.repeat(lo - starts, lengths)
    neighbours = cooc.indices[positions]
    scores = cooc.scores[positions] * np.repeat(np.asarray(seed_weights, np.float32), lengths)
    items, inverse = np.unique(neighbours, return_inverse=True)
    totals = np.bincount(inverse, scores, minlength=len(items)).astype(np.float32)
    best = np.argsort(-totals, kind="stable")[:n]
    return SourceList(source, items[best].astype(np.int32), totals[best])


def generate(
    history: UserHistory,
    *,
    ann_items: np.ndarray | None,
    ann_scores: np.ndarray | None,
    stats: ItemStats,
    cooc: CoOccurrence,
    cfg: CandidateConfig,
    now: int,
    extra: Sequence[SourceList] = (),
    cf_items: np.ndarray | None = None,
    cf_scores: np.ndarray | None = None,
) -> Candidates:
    """All sources for one user, each capped by `cfg`, merged and capped at `cfg.max_candidates`.

    `ann_items`/`ann_scores` is this user's row of a FAISS search (ids < 0 are padding and
    dropped); `extra` carries request-specific sources (session, query) built by the caller;
    `cf_items`/`cf_scores` is this user's collaborative-filtering search (CFModel.search_many).
    One user of `generate_many`, so ranker training, the refill round and serving share one
    definition; tests/recsvc/test_candidates.py keeps the numpy one as the reference.
    """
    return generate_many(
        [history],
        ann_items=[ann_items],
        ann_scores=[ann_scores],
        stats=stats,
        cooc=cooc,
        cfg=cfg,
        nows=[now],
        extras=[extra],
        cf_items=[cf_items],
        cf_scores=[cf_scores],
    )[0]


def _searched_lists(
    ann_items: np.ndarray | None,
    ann_scores: np.ndarray | None,
    cf_items: np.ndarray | None,
    cf_scores: np.ndarray | None,
    cfg: CandidateConfig,
) -> list[SourceList]:
    """One user's ANN row (padding ids < 0 dropped) and cf row as source lists, capped by `cfg`."""
    lists = []
    if ann_items is not None and ann_scores is not None:
        valid = np.asarray(ann_items) >= 0
        lists.append(
            SourceList(
                "ann",
                np.asarray(ann_items)[valid][: cfg.ann].astype(np.int32),
                np.asarray(ann_scores)[valid][: cfg.ann].astype(np.float32),
            )
        )
    if cf_items is not None and cf_scores is not None and cfg.cf > 0:
        lists.append(
            SourceList(
                "cf",
                np.asarray(cf_items)[: cfg.cf].astype(np.int32),
                np.asarray(cf_scores)[: cfg.cf].astype(np.float32),
            )
        )
    return lists


# ------------------------------------------------------------------ many users at once


def generate_many(
    histories: Sequence[UserHistory],
    *,
    ann_items: Sequence[np.ndarray | None],
    ann_scores: Sequence[np.ndarray | None],
    stats: ItemStats,
    cooc: CoOccurrence,
    cfg: CandidateConfig,
    nows: Sequence[int],
    extras: Sequence[Sequence[SourceList]] | None = None,
    cf_items: Sequence[np.ndarray | None] | None = None,
    cf_scores: Sequence[np.ndarray | None] | None = None,
    events: HistoryRows | None = None,
) -> list[Candidates]:
    """All sources for many users (each as `generate` describes), in one compiled kernel.
    `events`: `HistoryRows.of(histories, nows)` when the caller has it already (the features
    of the same block use it too).

    Why: per user, candidate generation is ~40 numpy calls on arrays of a few hundred rows, so
    call overhead, not arithmetic, was its cost on the serving path. Here the computed sources
    (repeat, co-occurrence) and the union run for the whole block in one compiled kernel with the
    GIL released (`candidate_kernels.generate_block`); tests check it against the numpy
    definition sum for sum and tie for tie.
    """
    n_users = len(histories)
    if not (len(ann_items) == len(ann_scores) == len(nows) == n_users):
        raise ValueError("histories, ann_items, ann_scores and nows must have the same length")
    if n_users == 0:
        return []
    if events is None:
        events = HistoryRows.of(histories, nows)
    decayed = events.weights * decay(events.now - events.timestamps, cfg.cooc_half_life_days)
    given: list[SourceList] = []
    table: list[tuple[int, int, int]] = []
    list_offsets = np.zeros(n_users + 1, dtype=np.int64)
    filled = 0
    for u in range(n_users):
        lists = list(extras[u]) if extras is not None else []
        lists += _searched_lists(
            ann_items[u],
            ann_scores[u],
            cf_items[u] if cf_items is not None and cf_scores is not None else None,
            cf_scores[u] if cf_items is not None and cf_scores is not None else None,
            cfg,
        )
        for source_list in lists:
            table.append((SOURCE_BITS[source_list.source], filled, filled + len(source_list.items)))
            filled += len(source_list.items)
            given.append(source_list)
        list_offsets[u + 1] = len(table)
    popular = popular_source(stats, cfg.popular)
    given_items = np.concatenate(
        [np.zeros(0, np.int64)] + [np.asarray(s.items, dtype=np.int64) for s in given]
    )
    if len(events.items) and int(events.items.max()) >= cooc.n_items:
        # the kernel does not bounds-check; this is the IndexError numpy indexing would raise
        raise IndexError(
            f"history item {int(events.items.max())} is outside the co-occurrence table ({cooc.n_items} items)"
        )
    # every item index the kernel sees: history items (< cooc.n_items, checked above) and given ones
    n_items = max(stats.n_items, cooc.n_items, int(given_items.max()) + 1 if len(given_items) else 0)
    columns = generate_block(
        events.offsets,
        events.items,
        decayed,
        cooc.indptr,
        cooc.indices,
        cooc.scores,
        given_items,
        np.concatenate([np.zeros(0, np.float32)] + [np.asarray(s.scores, dtype=np.float32) for s in given]),
        np.asarray(table, dtype=np.int64).reshape(-1, 3),
        list_offsets,
        popular.items.astype(np.int64),
        popular.scores.astype(np.float32),
        max(cfg.repeat, 0),
        max(cfg.cooccurrence, 0),
        4 * COOC_RECENT_ITEMS,
        COOC_RECENT_ITEMS,
        cfg.max_candidates,
        item_slots(n_items),
    )
    bounds = columns[-1].tolist()
    return [Candidates(*(c[a:b] for c in columns[:-1])) for a, b in itertools.pairwise(bounds)]
