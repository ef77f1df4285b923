"""Candidate generation: a union of cheap sources that the ranker then orders.

ANN search itself happens outside (so recsvc-batch can run one batched FAISS search); this module
turns its result plus the user's own history, popularity and co-occurrence into one deduplicated
list with a bitmask of which sources proposed each item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsvc.behaviour import CoOccurrence, ItemStats, decay
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


def repeat_source(history: UserHistory, now: int, n: int, half_life_days: float) -> SourceList:
    """The user's own items by recency-weighted count (repurchase / re-view)."""
    if len(history) == 0 or n <= 0:
        return SourceList("repeat", np.zeros(0, np.int32), np.zeros(0, np.float32))
    w = history.weights * decay(now - history.timestamps, half_life_days)
    items, inverse = np.unique(history.items, return_inverse=True)
    scores = np.bincount(inverse, w, minlength=len(items)).astype(np.float32)
    best = np.argsort(-scores, kind="stable")[:n]
    return SourceList("repeat", items[best].astype(np.int32), scores[best])


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


def recent_seeds(history: UserHistory, now: int, half_life_days: float) -> tuple[np.ndarray, np.ndarray]:
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
    """
    lists: list[SourceList] = list(extra) + _searched_lists(ann_items, ann_scores, cf_items, cf_scores, cfg)
    lists.append(repeat_source(history, now, cfg.repeat, cfg.cooc_half_life_days))
    seeds, seed_w = recent_seeds(history, now, cfg.cooc_half_life_days)
    lists.append(cooc_source(seeds, seed_w, cooc, cfg.cooccurrence))
    lists.append(popular_source(stats, cfg.popular))
    return merge(lists, cfg.max_candidates)


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
) -> list[Candidates]:
    """`generate` for many users: element i equals `generate(histories[i], ...)` bit for bit.

    Why: per user, candidate generation is ~40 numpy calls on arrays of a few hundred rows, so
    call overhead, not arithmetic, was its cost on the serving path. Here every per-user step
    (repeat counts, recent seeds, co-occurrence sums, the union) runs once over all users with
    each row keyed by (user, item). Sums accumulate in the same input order and sorts break ties
    the same way as one user at a time, so every value and every order is unchanged.
    """
    n_users = len(histories)
    if not (len(ann_items) == len(ann_scores) == len(nows) == n_users):
        raise ValueError("histories, ann_items, ann_scores and nows must have the same length")
    if n_users == 0:
        return []
    stride = np.int64(max(stats.n_items, cooc.n_items, 1))
    events = HistoryRows.of(histories, nows)
    repeat = _repeat_many(events, n_users, stride, cfg.repeat, cfg.cooc_half_life_days)
    seeds = _recent_seeds_many(events, stride, cfg.cooc_half_life_days)
    cooc_lists = _cooc_many(seeds, n_users, cooc, stride, cfg.cooccurrence)
    popular = popular_source(stats, cfg.popular)
    per_user: list[list[SourceList]] = []
    for u in range(n_users):
        lists: list[SourceList] = list(extras[u]) if extras is not None else []
        lists += _searched_lists(
            ann_items[u],
            ann_scores[u],
            cf_items[u] if cf_items is not None and cf_scores is not None else None,
            cf_scores[u] if cf_items is not None and cf_scores is not None else None,
            cfg,
        )
        lists += [repeat[u], cooc_lists[u], popular]
        per_user.append(lists)
    return merge_many(per_user, cfg.max_candidates)


def _ranked_within_user(seg: np.ndarray, order: np.ndarray, limit: int) -> np.ndarray:
    """`order` (rows grouped by user, users ascending) cut to its first `limit` rows per user."""
    seg_sorted = seg[order]
    starts = np.searchsorted(seg_sorted, seg_sorted, side="left")
    return order[np.arange(len(order)) - starts < limit]


def _split(seg: np.ndarray, n_users: int, *arrays: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Rows grouped by ascending `seg` -> per user, a tuple of each array's slice."""
    bounds = np.concatenate([[0], np.cumsum(np.bincount(seg, minlength=n_users))]).tolist()
    return [tuple(a[bounds[u] : bounds[u + 1]] for a in arrays) for u in range(n_users)]


def _top_per_user(
    keys: np.ndarray, weights: np.ndarray, n_users: int, stride: np.int64, n: int, source: str
) -> list[SourceList]:
    """Per user: items summed by key (user * stride + item), best `n` by sum (ties by item)."""
    empty = SourceList(source, np.zeros(0, np.int32), np.zeros(0, np.float32))
    if n <= 0 or len(keys) == 0:
        return [empty] * n_users
    unique, inverse = np.unique(keys, return_inverse=True)
    totals = np.bincount(inverse, weights, minlength=len(unique)).astype(np.float32)
    seg = unique // stride
    # per user: argsort(-totals, stable) over items ascending == lexsort by (user, -total), stable
    best = _ranked_within_user(seg, np.lexsort((-totals, seg)), n)
    items = (unique[best] % stride).astype(np.int32)
    return [
        SourceList(source, i, s) if len(i) else empty
        for i, s in _split(seg[best], n_users, items, totals[best])
    ]


def _repeat_many(
    events: HistoryRows, n_users: int, stride: np.int64, n: int, half_life_days: float
) -> list[SourceList]:
    """`repeat_source` for every user."""
    w = events.weights * decay(events.now - events.timestamps, half_life_days)
    return _top_per_user(events.seg * stride + events.items, w, n_users, stride, n, "repeat")


@dataclass(frozen=True)
class _Seeds:
    seg: np.ndarray  # int64 user of each seed, ascending
    items: np.ndarray  # int32
    weights: np.ndarray  # float32


def _recent_seeds_many(events: HistoryRows, stride: np.int64, half_life_days: float) -> _Seeds:
    """`recent_seeds` for every user, concatenated in user order."""
    lengths = np.diff(events.offsets)
    tail = np.minimum(lengths, 4 * COOC_RECENT_ITEMS)
    total = int(tail.sum())
    if total == 0:
        return _Seeds(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    # each user's last `tail` events, newest first
    starts = np.cumsum(tail) - tail
    rows = np.repeat(events.offsets[1:] - 1 + starts, tail) - np.arange(total)
    seg = events.seg[rows]
    # weights * decay over the tail in chronological order, then reversed: elementwise, so equal
    w = events.weights[rows] * decay(events.now[rows] - events.timestamps[rows], half_life_days)
    unique, first, inverse = np.unique(
        seg * stride + events.items[rows], return_index=True, return_inverse=True
    )
    totals = np.bincount(inverse, w, minlength=len(unique))
    keep = _ranked_within_user(unique // stride, np.argsort(first, kind="stable"), COOC_RECENT_ITEMS)
    return _Seeds(
        unique[keep] // stride, (unique[keep] % stride).astype(np.int32), totals[keep].astype(np.float32)
    )


def _cooc_many(seeds: _Seeds, n_users: int, cooc: CoOccurrence, stride: np.int64, n: int) -> list[SourceList]:
    """`cooc_source` of every user's recent seeds."""
    lo = cooc.indptr[seeds.items]
    lengths = cooc.indptr[seeds.items.astype(np.int64) + 1] - lo
    if n <= 0 or int(lengths.sum()) == 0:
        return _top_per_user(np.zeros(0, np.int64), np.zeros(0), n_users, stride, 0, "cooc")
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum())) + np.repeat(lo - starts, lengths)
    neighbours = cooc.indices[positions].astype(np.int64)
    scores = cooc.scores[positions] * np.repeat(seeds.weights, lengths)
    keys = np.repeat(seeds.seg, lengths) * stride + neighbours
    return _top_per_user(keys, scores, n_users, stride, n, "cooc")


def merge_many(per_user: Sequence[Sequence[SourceList]], max_candidates: int) -> list[Candidates]:
    """`merge` for many users' source lists at once (element i equals `merge(per_user[i], ...)`)."""
    n_users = len(per_user)
    ordered = [sorted(lists, key=lambda s: SOURCE_PRIORITY.index(s.source)) for lists in per_user]
    flat = [s for lists in ordered for s in lists]
    lengths = np.fromiter((len(s.items) for s in flat), dtype=np.int64, count=len(flat))
    if int(lengths.sum()) == 0:
        return [Candidates.empty() for _ in range(n_users)]
    items = np.concatenate([np.asarray(s.items, dtype=np.int32) for s in flat]).astype(np.int64)
    scores = np.concatenate([np.asarray(s.scores, dtype=np.float32) for s in flat])
    stride = np.int64(items.max() + 1)  # rows keyed by (user, item)
    list_user = np.repeat(np.arange(n_users, dtype=np.int64), [len(lists) for lists in ordered])
    seg = np.repeat(list_user, lengths)
    bits = np.repeat(np.asarray([SOURCE_BITS[s.source] for s in flat], dtype=np.uint8), lengths)
    position = (np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(
        np.float32
    )
    unique, first, inverse = np.unique(seg * stride + items, return_index=True, return_inverse=True)
    sources = np.zeros(len(unique), np.uint8)
    np.bitwise_or.at(sources, inverse, bits)
    evidence = {}
    for name, source, values in (
        ("ann", "ann", scores),
        ("ann_rank", "ann", position),
        ("cooc", "cooc", scores),
        ("repeat", "repeat", scores),
        ("cf_rank", "cf", position),
    ):
        column = np.full(len(unique), np.nan, np.float32)
        rows = bits == SOURCE_BITS[source]
        column[inverse[rows]] = values[rows]  # a repeated item in one list: the last one wins, as in merge
        evidence[name] = column
    order = _ranked_within_user(unique // stride, np.argsort(first, kind="stable"), max_candidates)
    return [
        Candidates(*parts)
        for parts in _split(
            unique[order] // stride,
            n_users,
            (unique[order] % stride).astype(np.int32),
            sources[order],
            evidence["ann"][order],
            evidence["ann_rank"][order],
            evidence["cooc"][order],
            evidence["repeat"][order],
            evidence["cf_rank"][order],
        )
    ]
