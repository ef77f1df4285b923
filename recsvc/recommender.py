"""The request path shared by the gRPC server and recsvc-batch (docs/ARCHITECTURE.md "Request path").

history (bundle + events since) -> user vector (user tower over item embeddings) -> candidates
(FAISS ANN + repeat + popular + co-occurrence [+ session, query]) -> hard filters -> features ->
ranker -> diversity cap -> top k.

`recommend` is `recommend_many` with one request, so the batch tool and the server give the same
answer by construction: the FAISS search, the candidate sources (candidates.generate_many), the
feature matrix (features.build_features_many) and the ranker call are batched, each equal bit for
bit to one user at a time; ANN scores are recomputed exactly per request so batch-size-dependent
BLAS rounding cannot reorder results.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from recsvc.candidate_kernels import cold_pool_rows, item_slots
from recsvc.candidates import (
    BITS_BY_NAMES,
    NAMES_BY_BITS,
    SOURCE_BITS,
    Candidates,
    SourceList,
    cooc_source,
    focus_on_query,
    generate,
    generate_many,
    merge,
)
from recsvc.cold_pool import COLD_NEIGHBOURS_DEPTH, ColdNeighbours
from recsvc.cold_slots import cold_slot_count
from recsvc.config import CandidateConfig, RecommenderConfig
from recsvc.features import HISTORY_COS_ITEMS, build_features_many, feature_index, pairwise_dot, tower_inputs
from recsvc.final_order import final_rows
from recsvc.history import Event, HistoryRows, UserHistory
from recsvc.retrieval import best_first, ranked_search, rescored
from recsvc.user_tower import user_vector

if TYPE_CHECKING:
    from recsvc.bundle import LoadedBundle
    from recsvc.encoder import TextEncoder

log = logging.getLogger(__name__)

REPEAT_POLICIES = ("allow", "exclude")
# Deepest ANN search used to refill after filters (FAISS GPU indexes cap k at 2048).
MAX_FILTERED_DEPTH = 2048
# Candidate rows featurised and ranked together in recommend_many (see _blocks).
RANK_BLOCK_ROWS = 16_384
STAGES = ("user_vector", "retrieval", "candidates", "filters", "features", "ranking", "total")
_NO_ITEMS = np.zeros(0, np.int32)
_NO_ITEMS.flags.writeable = False  # shared by every request without exclusions
_NO_CODES = np.zeros(0, np.int32)  # no diversity cap


class UnknownItemError(KeyError):
    """Item ids that the bundle's catalogue does not know (`item_ids` lists them)."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids = list(item_ids)
        shown = ", ".join(repr(i) for i in self.item_ids[:10])
        more = f" (+{len(self.item_ids) - 10} more)" if len(self.item_ids) > 10 else ""
        super().__init__(f"unknown item id(s): {shown}{more}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class RankingPolicy:
    """What an A/B variant can change."""

    use_ranker: bool = True  # False: order by text-interest (ANN) score only
    max_per_category: int | None = None  # diversity cap on `diversity_attribute`
    diversity_attribute: str = "category"


@dataclass(frozen=True)
class RecommendRequest:
    user_id: str
    k: int = 10
    session_items: tuple[str, ...] = ()
    query: str | None = None
    exclude_items: frozenset[str] = frozenset()
    include_attributes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    exclude_attributes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    repeat_policy: str = "allow"  # allow | exclude (items the user already has)
    explain: bool = False
    now: int | None = None  # reference time; None = recommender clock


@dataclass(slots=True)
class ScoredItem:
    item_id: str
    score: float
    sources: tuple[str, ...]
    explanation: str | None = None


@dataclass(frozen=True)
class RankedColumns:
    """A result's items as columns, best first: what bulk consumers (recsvc-batch) read."""

    item_ids: np.ndarray  # object [k] of str
    scores: np.ndarray  # float64 [k]
    source_bits: np.ndarray  # uint8 [k], SOURCE_BITS of the sources that proposed each item
    explanations: list[str | None] | None = None  # None = no explanations asked for
    items: np.ndarray | None = None  # int32 [k] catalogue rows of item_ids; None when not known

    def __len__(self) -> int:
        return len(self.item_ids)

    def scored_items(self) -> list[ScoredItem]:
        explanations = self.explanations if self.explanations is not None else [None] * len(self)
        return [
            ScoredItem(item_id, score, NAMES_BY_BITS[bits], explanation)
            for item_id, score, bits, explanation in zip(
                self.item_ids.tolist(), self.scores.tolist(), self.source_bits.tolist(), explanations
            )
        ]


class RecommendResult:
    """One answer. Built either from `ScoredItem`s or from `RankedColumns`; the other form is made
    on first use.

    Why both: a batch job writes ~100 items for each of millions of users as columns, and making
    a Python object per item (only to take it apart again) was a tenth of its time; the online
    service reads `items`.
    """

    __slots__ = ("_columns", "_items", "model_version", "personalised", "timings_ms", "unknown_items")

    def __init__(
        self,
        items: list[ScoredItem] | None,
        model_version: str,
        unknown_items: list[str],
        personalised: bool,
        timings_ms: dict[str, float],
        *,
        columns: RankedColumns | None = None,
    ) -> None:
        if (items is None) == (columns is None):
            raise ValueError("RecommendResult needs exactly one of items or columns")
        self._items = items
        self._columns = columns
        self.model_version = model_version
        self.unknown_items = unknown_items
        self.personalised = personalised
        self.timings_ms = timings_ms

    @property
    def items(self) -> list[ScoredItem]:
        if self._items is None:
            assert self._columns is not None
            self._items = self._columns.scored_items()
        return self._items

    @property
    def columns(self) -> RankedColumns:
        if self._columns is None:
            items = self.items
            self._columns = RankedColumns(
                np.asarray([it.item_id for it in items], dtype=object),
                np.asarray([it.score for it in items], dtype=np.float64),
                np.asarray([BITS_BY_NAMES[it.sources] for it in items], dtype=np.uint8),
                [it.explanation for it in items],
            )
        return self._columns

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecommendResult):
            return NotImplemented
        return (
            self.items == other.items
            and self.model_version == other.model_version
            and self.unknown_items == other.unknown_items
            and self.personalised == other.personalised
            and self.timings_ms == other.timings_ms
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (
            f"RecommendResult(items={self.items!r}, model_version={self.model_version!r}, "
            f"unknown_items={self.unknown_items!r}, personalised={self.personalised!r}, "
            f"timings_ms={self.timings_ms!r})"
        )


@dataclass
class _Prepared:
    """Per-request state before the (batched) ANN search."""

    req: RecommendRequest
    now: int
    history: UserHistory  # bundle history + online events + session items
    session_idx: np.ndarray
    unknown: list[str]
    user_vec: np.ndarray | None
    query_vec: np.ndarray | None
    allowed: np.ndarray | None  # item mask from attribute filters, None = all
    cf_vec: np.ndarray | None  # ALS user factor folded in from `history`
    # items the request may not get: its exclusions, plus everything it has under repeat_policy=exclude
    blocked: np.ndarray

    @property
    def ranking_vec(self) -> np.ndarray | None:
        """The vector text interest is measured against: the user's, else the query's."""
        return self.user_vec if self.user_vec is not None else self.query_vec


def _anonymous(p: _Prepared) -> bool:
    """No history, no session items, no query: nothing personal to rank on.

    Every such user gets the same feature rows, so the ranker can only reorder popular items; on
    H&M's validation window its order was no better than plain recent popularity (NDCG@12
    0.013-0.019 vs 0.018 across ranker seeds), so these requests get the popularity order.
    """
    return len(p.history) == 0 and len(p.session_idx) == 0 and p.query_vec is None


def _query_only(p: _Prepared) -> bool:
    """A free-text query and nothing else: order by similarity to the query.

    The ranker learned from users whose vector pools their history; it never saw a query vector,
    and on the demo shop it put popular backpacks above the running shoes a shopper typed.
    """
    return len(p.history) == 0 and len(p.session_idx) == 0 and p.query_vec is not None


class Recommender:
    """Serves one loaded bundle; thread-safe (events mutate under a lock, reads are lock-free)."""

    def __init__(self, bundle: LoadedBundle, config: RecommenderConfig | None = None) -> None:
        self.bundle = bundle
        self.config = config or RecommenderConfig()
        self.catalog = bundle.catalog
        self.item_emb = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
        self._cold_neighbours = ColdNeighbours(bundle.index, self.item_emb, self.config.cold_pool_effort)
        self.cand_cfg = bundle.config.candidates
        self.event_weights = dict(bundle.config.data.event_weights)
        self.history_len = bundle.tower.history_len
        self._lock = threading.RLock()
        self._clock = int(bundle.data_end_ts)
        self._encoder: TextEncoder | None = None
        self._encoder_lock = threading.Lock()
        self._warned_attributes: set[str] = set()

    # ------------------------------------------------------------------ public API

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def clock(self) -> int:
        """max(bundle data end, newest event seen): replayed and live traffic share features."""
        return self._clock

    def warm(self, *, query_encoder: bool = True) -> None:
        """Run every stage once (compiles/verifies the ranker fast path, touches index pages) and
        load the query encoder, so the first real request does not pay for any of it.

        `query_encoder=False` leaves the encoder to load on the first free-text query: recsvc-batch
        never sends one, and loading BERT took ~4 s of every batch job's start.
        """
        users = self.bundle.history.users()
        user = users[0] if users else "__warm__"
        reqs = [
            RecommendRequest(user_id=user, k=5),
            RecommendRequest(user_id=user, k=5, repeat_policy="exclude"),
        ]
        self.recommend_many(reqs)
        self.recommend_many(reqs, RankingPolicy(use_ranker=False))
        if query_encoder:
            try:
                self._encode_query("warm up")
            except Exception as exc:  # a broken encoder fails query requests, not the whole model
                log.warning("query encoder in %s could not be loaded: %s", self.bundle.encoder_dir, exc)
        # The bundle holds millions of long-lived Python objects (user and item ids); without this,
        # every full garbage collection that request results trigger rescans all of them (measured:
        # a third of recommend_many's per-user time). Frozen objects are still freed by refcount.
        gc.freeze()

    def recommend(self, req: RecommendRequest, policy: RankingPolicy = RankingPolicy()) -> RecommendResult:
        return self.recommend_many([req], policy)[0]

    def recommend_many(
        self, reqs: Sequence[RecommendRequest], policy: RankingPolicy = RankingPolicy()
    ) -> list[RecommendResult]:
        """Many requests with one FAISS search, then features + ranker per cache-sized block of
        requests (`_blocks`); same answers as `recommend`."""
        if not reqs:
            return []
        timings = dict.fromkeys(STAGES, 0.0)
        start = time.perf_counter()
        prepared = [self._prepare(r) for r in reqs]
        timings["user_vector"] = _ms(start)

        t = time.perf_counter()
        depth = min(self.cand_cfg.ann, len(self.catalog))
        ann = self._search_many([p.user_vec for p in prepared], depth)
        queries = self._search_many([p.query_vec for p in prepared], self.config.query_candidates)
        cf = self._cf_search_many(prepared)
        timings["retrieval"] = _ms(t)

        results: list[RecommendResult] = []
        for block in _blocks(len(prepared), self.cand_cfg.max_candidates):
            results += self._rank_block(
                [prepared[i] for i in block],
                [ann[i] for i in block],
                [queries[i] for i in block],
                [cf[i] for i in block],
                policy,
                timings,
            )
        timings["total"] = _ms(start)
        for result in results:
            result.timings_ms = dict(timings)
        return results

    def _rank_block(
        self,
        prepared: Sequence[_Prepared],
        ann: Sequence[tuple[np.ndarray, np.ndarray]],
        queries: Sequence[tuple[np.ndarray, np.ndarray]],
        cf: Sequence[tuple[np.ndarray, np.ndarray]],
        policy: RankingPolicy,
        timings: dict[str, float],
    ) -> list[RecommendResult]:
        """Candidates, one feature matrix and one ranker call for a block of requests."""
        t = time.perf_counter()
        # the block's events, for both the candidate sources and the features
        events = HistoryRows.of([p.history for p in prepared], [p.now for p in prepared])
        timings["candidates"] += _ms(t)
        generated = self._generate_many(prepared, ann, queries, cf, events, timings)
        cands = [
            self._candidates(p, g, a, q, c, timings)
            for p, g, a, q, c in zip(prepared, generated, ann, queries, cf)
        ]
        cands = self._with_cold_pool(prepared, cands, timings)

        t = time.perf_counter()
        features = build_features_many(
            [p.history for p in prepared],
            cands,
            [p.ranking_vec for p in prepared],
            self.item_emb,
            self.catalog,
            self.bundle.item_stats,
            [p.now for p in prepared],
            self.cand_cfg,
            cf=self.bundle.cf,
            cf_user_factors=[p.cf_vec for p in prepared],
            events=events,
        )
        bounds = np.cumsum([0] + [len(c) for c in cands])
        rows = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        timings["features"] += _ms(t)

        t = time.perf_counter()
        if policy.use_ranker and len(features):
            scores = self._predict(prepared, features, np.diff(bounds))
            per_request = [scores[r] for r in rows]
            for i, (p, c) in enumerate(zip(prepared, cands)):
                if _anonymous(p):
                    per_request[i] = self.bundle.item_stats.popularity[c.items].astype(np.float64)
                elif _query_only(p):
                    per_request[i] = _text_interest(features[rows[i]])
        else:
            per_request = [_text_interest(features[r]) for r in rows]
        timings["ranking"] += _ms(t)

        t = time.perf_counter()
        results = self._finish(prepared, cands, per_request, features, bounds, policy)
        timings["filters"] += _ms(t)
        return results

    def _predict(self, prepared: Sequence[_Prepared], features: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Ranker scores; rows of repeat_policy=exclude requests go to the bundle's novel ranker
        when it has one (trained for lists without owned items), the rest to the main ranker."""
        novel = self.bundle.novel_ranker
        excluding = np.repeat([p.req.repeat_policy == "exclude" for p in prepared], sizes)
        if novel is None or not excluding.any():
            return np.asarray(self.bundle.ranker.predict(features), dtype=np.float64)
        scores = np.empty(len(features), dtype=np.float64)
        scores[excluding] = novel.predict(features[excluding])
        if not excluding.all():
            scores[~excluding] = self.bundle.ranker.predict(features[~excluding])
        return scores

    def similar_items(
        self,
        item_id: str,
        k: int,
        exclude_items: frozenset[str] = frozenset(),
        include_attributes: Mapping[str, frozenset[str]] | None = None,
        exclude_attributes: Mapping[str, frozenset[str]] | None = None,
    ) -> RecommendResult:
        """Items like `item_id`: embedding neighbours plus co-occurrence, same filters as recommend.

        Score = cosine to the item + co-occurrence score (0 when the pair never co-occurred).
        """
        start = time.perf_counter()
        _check_k(k)
        idx = self.catalog.index.get(item_id)
        if idx is None:
            raise UnknownItemError([item_id])
        timings = dict.fromkeys(("retrieval", "candidates", "filters", "total"), 0.0)
        allowed = self.catalog.filter_mask(include_attributes, exclude_attributes)
        blocked = self._blocked({item_id, *exclude_items})
        query = self.item_emb[idx]
        t = time.perf_counter()
        depth = min(len(self.catalog), MAX_FILTERED_DEPTH, max(self.cand_cfg.ann, k + 1))
        if allowed is None and len(blocked) == 1:
            ((items, scores),) = self._search_many([query], depth)
        else:
            items, scores = self._search_filtered(query, depth, allowed, blocked)
        timings["retrieval"] = _ms(t)
        t = time.perf_counter()
        neighbours, co = self.bundle.cooccurrence.neighbours(idx)
        cands = merge(
            [SourceList("ann", items, scores), SourceList("cooc", neighbours, co)],
            len(items) + len(neighbours),
        )
        timings["candidates"] = _ms(t)
        cands = self._filtered(cands, allowed, blocked, timings)
        if len(cands) < k:
            cands = self._fill(k, cands, allowed, blocked)
        cos = self.item_emb[cands.items] @ query
        score = cos + np.nan_to_num(cands.cooc_score, nan=0.0)
        order = best_first(score, cands.items)[:k]
        out = [
            ScoredItem(str(self.catalog.item_ids[cands.items[i]]), float(score[i]), cands.source_names(i))
            for i in order
        ]
        timings["total"] = _ms(start)
        return RecommendResult(out, self.model_version, [], False, timings)

    def record_events(self, events: Sequence[Event]) -> None:
        """Apply events to histories and item counters; all-or-nothing validation first."""
        unknown_types = sorted({e.event for e in events} - set(self.event_weights))
        if unknown_types:
            raise ValueError(
                f"unknown event type(s): {', '.join(map(repr, unknown_types))}; "
                f"known: {', '.join(map(repr, self.event_weights))}"
            )
        unknown_items = sorted({e.item_id for e in events if e.item_id not in self.catalog.index})
        if unknown_items:
            raise UnknownItemError(unknown_items)
        with self._lock:
            store, stats = self.bundle.history, self.bundle.item_stats
            for e in events:
                idx = self.catalog.index[e.item_id]
                prior = int(np.count_nonzero(store.get(e.user_id).items == idx))
                weight = self._event_weight(e)
                store.append(e.user_id, idx, int(e.timestamp), weight)
                stats.update(idx, int(e.timestamp), weight, prior)
                self._clock = max(self._clock, int(e.timestamp))

    # ------------------------------------------------------------------ stages

    def _event_weight(self, e: Event) -> float:
        """Same rule as training.data.event_weight: configured weight, times value for ratings."""
        base = float(self.event_weights[e.event])
        return base * float(e.value) if e.event == "rating" and e.value is not None else base

    def _prepare(self, req: RecommendRequest) -> _Prepared:
        _check_k(req.k)
        if req.repeat_policy not in REPEAT_POLICIES:
            raise ValueError(
                f"repeat_policy must be one of {', '.join(REPEAT_POLICIES)}, got {req.repeat_policy!r}"
            )
        now = int(req.now) if req.now is not None else self.clock()
        history = self.bundle.history.get(req.user_id)
        if req.now is not None:
            history = history.before(now + 1)
        session_idx, unknown = self.catalog.ids_to_indices(req.session_items)
        if len(session_idx):
            history = history.with_events(
                session_idx,
                np.full(len(session_idx), now, np.int64),
                np.full(len(session_idx), self.config.session_event_weight, np.float32),
            )
        user_vec = None
        if len(history):
            emb, ages, weights = tower_inputs(history, self.item_emb, now, self.history_len)
            user_vec = user_vector(self.bundle.tower, emb, ages, weights)
        query_vec = self._encode_query(req.query) if req.query and req.query.strip() else None
        allowed = self.catalog.filter_mask(req.include_attributes, req.exclude_attributes)
        cf_vec = self.bundle.cf.user_factor(history, now) if self.bundle.cf is not None else None
        blocked = self._blocked(req.exclude_items)
        if req.repeat_policy == "exclude":
            blocked = np.union1d(blocked, history.items).astype(np.int32)
        return _Prepared(
            req, now, history, session_idx, unknown, user_vec, query_vec, allowed, cf_vec, blocked
        )

    def _search_many(
        self, vectors: Sequence[np.ndarray | None], depth: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """One FAISS search for all present vectors (`retrieval.ranked_search`: exact scores, ties by item)."""
        return ranked_search(self.bundle.index, self.item_emb, vectors, min(depth, len(self.catalog)))

    def _cf_search_many(self, prepared: Sequence[_Prepared]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One collaborative-filtering index search for every request with a user factor."""
        if self.bundle.cf is None or self.cand_cfg.cf <= 0:
            return [(np.zeros(0, np.int32), np.zeros(0, np.float32))] * len(prepared)
        return self.bundle.cf.search_many([p.cf_vec for p in prepared], self.cand_cfg.cf)

    def _cold_slots(self, p: _Prepared) -> int:
        return cold_slot_count(p.req.k, self.config.cold_item_share, self.config.cold_first_position)

    def _with_cold_pool(
        self, prepared: Sequence[_Prepared], cands: list[Candidates], timings: dict[str, float]
    ) -> list[Candidates]:
        """Each request's candidates plus, for each of its query vectors, the `slots` allowed
        never-seen items nearest to it, so the reserved cold slots can hold the best cold items by
        `_cold_interest` from the whole catalogue.

        The query vectors are the request's recent history items (the same last
        `HISTORY_COS_ITEMS` that `cos_hist_max` compares with), else its ranking vector (user or
        query). The union of each query's top-n is the top-n by max cosine over all cold items, so
        the slots see exactly the catalogue's best. Why history items rather than the user vector
        alone: a pooled vector blurs the single item a new arrival resembles (the pool used to
        search by the user vector only, and on H&M's held-out never-seen purchases the pipeline's
        cold recall stayed 0). Where the pools come from (`_cold_pools`) never makes a request's
        pool depend on the others, so batched and single answers agree. The never-seen mask is read
        per block, so items that get events while serving leave the pool at once. Added rows carry
        the `ann` source with their cosine to the ranking vector and no ANN rank.
        """
        if not self.config.cold_pool:
            return cands
        slots = {i: self._cold_slots(p) for i, p in enumerate(prepared)}
        todo = [
            i
            for i, p in enumerate(prepared)
            if slots[i] > 0 and (len(p.history) or p.ranking_vec is not None)
        ]
        never_seen = self.bundle.item_stats.never_seen()
        if not todo or not never_seen.any():
            return cands
        t = time.perf_counter()
        pools = self._cold_pools(prepared, todo, slots, never_seen)
        order = list(pools)
        if not order:
            return cands
        vecs = np.zeros((len(order), self.item_emb.shape[1]), np.float32)
        for j, i in enumerate(order):
            if prepared[i].ranking_vec is not None:
                vecs[j] = prepared[i].ranking_vec
        items, scores, bounds = cold_pool_rows(
            np.concatenate([pools[i] for i in order]).astype(np.int32, copy=False),
            np.cumsum([0] + [len(pools[i]) for i in order]),
            np.concatenate([cands[i].items for i in order]).astype(np.int32, copy=False),
            np.cumsum([0] + [len(cands[i]) for i in order]),
            vecs,
            np.array([prepared[i].ranking_vec is not None for i in order]),
            self.item_emb,
            item_slots(len(self.catalog)),
        )
        out = list(cands)
        for j, i in enumerate(order):
            rows = slice(bounds[j], bounds[j + 1])
            out[i] = _appended(cands[i], items[rows], SOURCE_BITS["ann"], scores[rows])
        timings["retrieval"] += _ms(t)
        return out

    def _cold_pools(
        self,
        prepared: Sequence[_Prepared],
        todo: Sequence[int],
        slots: dict[int, int],
        never_seen: np.ndarray,
    ) -> dict[int, np.ndarray]:
        """Request -> the never-seen items nearest to its cold queries (may repeat; -1 = none).

        Three sources, by what the request needs:
        - no attribute filter, with history: the cached lists of `ColdNeighbours` (searched once per
          item at a fixed depth), unless it excludes more never-seen items than a list can spare;
        - no attribute filter otherwise: one FAISS search shared by all of them, over-fetching by
          the most excluded never-seen items among them (removed afterwards);
        - attribute filters: a search of its own allowed never-seen set.
        """
        unfiltered = [i for i in todo if prepared[i].allowed is None]
        extras = {i: int(never_seen[prepared[i].blocked].sum()) for i in unfiltered}
        cached = [
            i
            for i in unfiltered
            if len(prepared[i].history) and slots[i] + extras[i] <= COLD_NEIGHBOURS_DEPTH
        ]
        pools = self._cached_cold_pools(prepared, cached, slots, never_seen)
        shared = [i for i in unfiltered if i not in pools]
        if shared:
            queries = {i: self._cold_queries(prepared[i]) for i in shared}
            depth = min(max(slots[i] for i in shared) + max(extras[i] for i in shared), MAX_FILTERED_DEPTH)
            _, ids = self.bundle.index.search_with_filter(
                np.vstack(list(queries.values())),
                depth,
                allowed=never_seen,
                effort=self.config.cold_pool_effort,
            )
            bounds = np.cumsum([0] + [len(q) for q in queries.values()])
            for i, a, b in zip(shared, bounds[:-1], bounds[1:]):
                rows = np.asarray(ids)[a:b]
                keep = (rows >= 0) & ~np.isin(rows, prepared[i].blocked)
                pools[i] = np.concatenate([row[k][: slots[i]] for row, k in zip(rows, keep)])
        for i in todo:
            p = prepared[i]
            if p.allowed is None or not (allowed := never_seen & p.allowed).any():
                continue
            _, ids = self.bundle.index.search_with_filter(
                self._cold_queries(p),
                min(slots[i], MAX_FILTERED_DEPTH),
                allowed=allowed,
                excluded=p.blocked.tolist(),
                effort=self.config.cold_pool_effort,
            )
            pools[i] = np.asarray(ids).ravel()
        return pools

    def _cached_cold_pools(
        self,
        prepared: Sequence[_Prepared],
        todo: Sequence[int],
        slots: dict[int, int],
        never_seen: np.ndarray,
    ) -> dict[int, np.ndarray]:
        """Request -> its pool from the cached neighbour lists of its recent history items."""
        if not todo:
            return {}
        items = {i: _cold_query_items(prepared[i].history) for i in todo}
        lists = self._cold_neighbours.lists(np.concatenate(list(items.values())), never_seen)
        pools = {}
        for i in todo:
            blocked = prepared[i].blocked
            rows = [lists[item] for item in items[i].tolist()]
            if len(blocked):
                rows = [row[~np.isin(row, blocked)] for row in rows]
            pools[i] = np.concatenate([row[: slots[i]] for row in rows])
        return pools

    def _cold_queries(self, p: _Prepared) -> np.ndarray:
        """The vectors the cold pool searches with: recent history items, else the ranking vector."""
        if len(p.history):
            return self.item_emb[_cold_query_items(p.history)]
        assert p.ranking_vec is not None  # `_with_cold_pool` only asks for requests that have one
        return np.asarray(p.ranking_vec, dtype=np.float32)[None, :]

    def _candidates(
        self,
        p: _Prepared,
        generated: Candidates,
        ann: tuple[np.ndarray, np.ndarray],
        query: tuple[np.ndarray, np.ndarray],
        cf: tuple[np.ndarray, np.ndarray],
        timings: dict[str, float],
    ) -> Candidates:
        """Sources (`generated` by `_generate_many`) -> hard filters (the cold pool and the
        features are added for the whole block afterwards).

        When the filters leave fewer than k items, ANN is searched again INSIDE the allowed set
        (FAISS filtered search), and if the catalogue still has allowed items left, the most popular
        of them fill up to k, so k results come back whenever the catalogue allows.
        """
        blocked = p.blocked
        cfg = self.cand_cfg
        cands = self._filtered(generated, p.allowed, blocked, timings)
        if p.query_vec is not None:
            cands = focus_on_query(cands, p.req.k)
        if len(cands) < p.req.k and (p.allowed is not None or len(blocked)):
            depth = min(
                len(self.catalog), MAX_FILTERED_DEPTH, max(cfg.ann, p.req.k) * self.config.filtered_ann_factor
            )
            t = time.perf_counter()
            if p.user_vec is not None:
                ann = self._search_filtered(p.user_vec, depth, p.allowed, blocked)
            if p.query_vec is not None:
                query = self._search_filtered(p.query_vec, depth, p.allowed, blocked)
            timings["retrieval"] += _ms(t)
            cands = self._filtered(
                self._generate(p, ann, query, cf, _widened(cfg, depth), timings), p.allowed, blocked, timings
            )
        if len(cands) < p.req.k:
            cands = self._fill(p.req.k, cands, p.allowed, blocked)
        return cands

    def _generate_many(
        self,
        prepared: Sequence[_Prepared],
        ann: Sequence[tuple[np.ndarray, np.ndarray]],
        queries: Sequence[tuple[np.ndarray, np.ndarray]],
        cf: Sequence[tuple[np.ndarray, np.ndarray]],
        events: HistoryRows,
        timings: dict[str, float],
    ) -> list[Candidates]:
        """Every request's candidate sources in one `generate_many` (equal to `_generate` each;
        its compiled kernel is the cheaper path from one request up)."""
        t = time.perf_counter()
        cands = generate_many(
            [p.history for p in prepared],
            ann_items=[a[0] if p.user_vec is not None else None for p, a in zip(prepared, ann)],
            ann_scores=[a[1] if p.user_vec is not None else None for p, a in zip(prepared, ann)],
            stats=self.bundle.item_stats,
            cooc=self.bundle.cooccurrence,
            cfg=self.cand_cfg,
            nows=[p.now for p in prepared],
            extras=[self._extra_sources(p, q) for p, q in zip(prepared, queries)],
            cf_items=[c[0] if p.cf_vec is not None else None for p, c in zip(prepared, cf)],
            cf_scores=[c[1] if p.cf_vec is not None else None for p, c in zip(prepared, cf)],
            events=events,
        )
        timings["candidates"] += _ms(t)
        return cands

    def _extra_sources(self, p: _Prepared, query: tuple[np.ndarray, np.ndarray]) -> list[SourceList]:
        """The request-specific sources: neighbours of session items, the free-text query's ANN."""
        extra = []
        if len(p.session_idx):
            seeds = np.unique(p.session_idx)
            extra.append(
                cooc_source(
                    seeds,
                    np.ones(len(seeds), np.float32),
                    self.bundle.cooccurrence,
                    self.config.session_neighbours,
                    source="session",
                )
            )
        if len(query[0]):
            extra.append(SourceList("query", query[0], query[1]))
        return extra

    def _generate(
        self,
        p: _Prepared,
        ann: tuple[np.ndarray, np.ndarray],
        query: tuple[np.ndarray, np.ndarray],
        cf: tuple[np.ndarray, np.ndarray],
        cfg: CandidateConfig,
        timings: dict[str, float],
    ) -> Candidates:
        """One request's sources (small blocks, and the widened refill round of `_candidates`)."""
        t = time.perf_counter()
        extra = self._extra_sources(p, query)
        cands = generate(
            p.history,
            ann_items=ann[0] if p.user_vec is not None else None,
            ann_scores=ann[1] if p.user_vec is not None else None,
            stats=self.bundle.item_stats,
            cooc=self.bundle.cooccurrence,
            cfg=cfg,
            now=p.now,
            extra=extra,
            cf_items=cf[0] if p.cf_vec is not None else None,
            cf_scores=cf[1] if p.cf_vec is not None else None,
        )
        timings["candidates"] += _ms(t)
        return cands

    def _filtered(
        self, cands: Candidates, allowed: np.ndarray | None, blocked: np.ndarray, timings: dict[str, float]
    ) -> Candidates:
        if allowed is None and not len(blocked):
            return cands  # nothing to filter (most requests): no copy of every column
        t = time.perf_counter()
        out = cands.take(self._keep_mask(cands.items, allowed, blocked))
        timings["filters"] += _ms(t)
        return out

    def _search_filtered(
        self, vector: np.ndarray, depth: int, allowed: np.ndarray | None, blocked: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """ANN restricted to allowed, non-blocked items, rescored exactly (`retrieval.rescored`): FAISS's
        filtered flat search scores with batch-dependent rounding, like its unfiltered one."""
        _, ids = self.bundle.index.search_with_filter(
            np.asarray(vector, dtype=np.float32)[None, :], depth, allowed=allowed, excluded=blocked.tolist()
        )
        found = np.asarray(ids)[0]
        return rescored(self.item_emb, found[found >= 0], vector)

    def _fill(self, k: int, cands: Candidates, allowed: np.ndarray | None, blocked: np.ndarray) -> Candidates:
        """Last resort when filters are very selective: the most popular allowed items (then by index)."""
        keep = self._keep_mask(np.arange(len(self.catalog), dtype=np.int32), allowed, blocked)
        keep[cands.items] = False
        pool = np.flatnonzero(keep).astype(np.int32)
        popularity = self.bundle.item_stats.popularity
        chosen = pool[np.lexsort((pool, -popularity[pool]))[: k - len(cands)]]
        return _appended(cands, chosen, SOURCE_BITS["popular"], np.full(len(chosen), np.nan, np.float32))

    def _finish(
        self,
        prepared: Sequence[_Prepared],
        cands: Sequence[Candidates],
        scores: Sequence[np.ndarray],
        features: np.ndarray,
        bounds: np.ndarray,
        policy: RankingPolicy,
    ) -> list[RecommendResult]:
        """Each request's list (`final_order.final_rows` for the block): best first by score, the
        reserved cold-start slots given to never-seen candidates by their text interest
        (`_cold_interest`), the diversity cap, k items."""
        items = np.concatenate([c.items for c in cands]).astype(np.int32, copy=False)
        never_seen = self.bundle.item_stats.never_seen()
        cold = np.where(never_seen[items], _cold_interest(features), np.nan)
        all_scores = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])
        codes, cap, n_values = self._cap(policy)
        rows, shown_bounds = final_rows(
            all_scores,
            items,
            cold,
            bounds,
            np.array([p.req.k for p in prepared], dtype=np.int64),
            np.array([self._cold_slots(p) for p in prepared], dtype=np.int64),
            self.config.cold_first_position,
            codes,
            cap,
            np.zeros(n_values, dtype=np.int64),
        )
        rows += np.repeat(bounds[:-1], np.diff(shown_bounds))
        shown = items[rows]
        item_ids = self.catalog.item_ids[shown]
        shown_scores = all_scores[rows]
        sources = np.concatenate([c.sources for c in cands])[rows]
        results = []
        for p, a, b in zip(prepared, shown_bounds[:-1], shown_bounds[1:]):
            columns = RankedColumns(
                item_ids[a:b],
                shown_scores[a:b],
                sources[a:b],
                self._explain(p.history, shown[a:b]) if p.req.explain else None,
                shown[a:b],
            )
            personalised = len(p.history) > 0 or p.query_vec is not None
            results.append(
                RecommendResult(None, self.model_version, p.unknown, personalised, {}, columns=columns)
            )
        return results

    def _cap(self, policy: RankingPolicy) -> tuple[np.ndarray, int, int]:
        """(codes per item, cap, number of values) of the policy's diversity cap; (empty, 0, 0)
        when there is none."""
        cap = policy.max_per_category
        if cap is None:
            return _NO_CODES, 0, 0
        codes = self.catalog.attributes.get(policy.diversity_attribute)
        if codes is None:
            if policy.diversity_attribute not in self._warned_attributes:
                self._warned_attributes.add(policy.diversity_attribute)
                log.warning(
                    "diversity cap ignored: catalogue has no attribute %r (has: %s)",
                    policy.diversity_attribute,
                    ", ".join(self.catalog.attributes) or "none",
                )
            return _NO_CODES, 0, 0
        return codes, int(cap), len(self.catalog.attribute_values[policy.diversity_attribute])

    def _explain(self, history: UserHistory, items: np.ndarray) -> list[str | None]:
        """For each item, the recent history item (other than itself) with the highest cosine."""
        if len(history) == 0 or len(items) == 0:
            return ["popular recently"] * len(items)
        recent = np.unique(history.items[-self.config.explain_history_items :])
        sims = pairwise_dot(self.item_emb[items], self.item_emb[recent])
        sims[items[:, None] == recent[None, :]] = -np.inf
        best = np.argmax(sims, axis=1)
        return [
            f"similar to {self.catalog.item_ids[recent[b]]}"
            if np.isfinite(sims[j, b])
            else "you had this before"
            for j, b in enumerate(best)
        ]

    def _blocked(self, item_ids: frozenset[str] | set[str]) -> np.ndarray:
        if not item_ids:
            return _NO_ITEMS
        idx, _ = self.catalog.ids_to_indices(sorted(item_ids))
        return np.unique(idx).astype(np.int32)

    def _keep_mask(self, items: np.ndarray, allowed: np.ndarray | None, blocked: np.ndarray) -> np.ndarray:
        keep = np.ones(len(items), dtype=bool) if allowed is None else allowed[items]
        if len(blocked):
            keep &= ~np.isin(items, blocked)
        return keep

    def _encode_query(self, query: str) -> np.ndarray:
        """Free-text query -> unit vector with the bundle's encoder (loaded on first use)."""
        from recsvc.text import query_text

        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    from recsvc.encoder import TextEncoder

                    self._encoder = TextEncoder.load(
                        self.bundle.encoder_dir, device="cpu", precision=self.config.query_precision
                    )
        return self._encoder.encode([query_text(query)], batch_size=1)[0]


def _cold_query_items(history: UserHistory) -> np.ndarray:
    """The history items whose nearest never-seen items make a request's cold pool."""
    return np.unique(history.items[-HISTORY_COS_ITEMS:])


def _text_interest(features: np.ndarray) -> np.ndarray:
    """The no-ranker score: cosine to the user (or query) vector, else to history, else source order."""
    cos = features[:, feature_index("cos_user")]
    hist = features[:, feature_index("cos_hist_max")]
    fallback = -np.arange(len(features), dtype=np.float64) / max(len(features), 1) - 2.0
    return np.where(np.isfinite(cos), cos, np.where(np.isfinite(hist), hist, fallback)).astype(np.float64)


def _cold_interest(features: np.ndarray) -> np.ndarray:
    """How a cold candidate ranks for the reserved slots: max cosine to the recent history items
    (`cos_hist_max`), else cosine to the ranking vector (users with only a session or a query)."""
    hist = features[:, feature_index("cos_hist_max")]
    return np.where(np.isfinite(hist), hist, features[:, feature_index("cos_user")])


def _appended(cands: Candidates, items: np.ndarray, source_bit: int, ann_score: np.ndarray) -> Candidates:
    """`cands` plus rows for `items` proposed by one source, with no evidence but `ann_score`."""
    nan = np.full(len(items), np.nan, np.float32)
    return Candidates(
        np.concatenate([cands.items, items]).astype(np.int32),
        np.concatenate([cands.sources, np.full(len(items), source_bit, np.uint8)]),
        np.concatenate([cands.ann_score, np.asarray(ann_score, dtype=np.float32)]),
        np.concatenate([cands.ann_rank, nan]),
        np.concatenate([cands.cooc_score, nan]),
        np.concatenate([cands.repeat_score, nan]),
        np.concatenate([cands.cf_rank, nan]),
    )


def _blocks(n_requests: int, rows_per_request: int) -> list[range]:
    """Consecutive request blocks of about RANK_BLOCK_ROWS candidate rows each.

    Why: one feature matrix for a 1024-user chunk is ~90 MB (and the ranker's float64 copy twice
    that), so every pass over it streams from RAM; blocks that fit in cache ranked 4x faster per
    row. Per-row features and scores do not depend on the block, so answers are unchanged.
    """
    size = max(1, RANK_BLOCK_ROWS // max(rows_per_request, 1))
    return [range(a, min(a + size, n_requests)) for a in range(0, n_requests, size)]


def _widened(cfg: CandidateConfig, depth: int) -> CandidateConfig:
    """The candidate config of an over-fetch round: deeper ANN, cap raised so nothing is cut."""
    return replace(
        cfg,
        ann=depth,
        max_candidates=max(cfg.max_candidates, depth + cfg.repeat + cfg.popular + cfg.cooccurrence),
    )


def _check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
