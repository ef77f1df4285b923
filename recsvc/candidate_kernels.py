"""Compiled (numba) candidate generation for a block of users: `recsvc.candidates.generate_many`.

Why compiled: per user, the sources and their union are a few dozen small sorts and sums, and as
numpy calls over a block they still cost more in call overhead than in arithmetic, all of it
holding the GIL. This kernel does the same work in one pass with the GIL released. It follows
the numpy definition (kept in tests/recsvc/test_candidates.py as the reference) exactly: the same
sums in the same order, the same tie-breaks, and the tests check its answers bit for bit.

Sources, in SOURCE_PRIORITY order: session, query (given), repeat (computed here), ann, cf
(given), cooc (computed here), popular (given, shared by all users).
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

# SOURCE_BITS of recsvc.candidates, as numba sees module constants at compile time.
_ANN, _REPEAT, _POPULAR, _COOC, _SESSION, _QUERY, _CF = 1, 2, 4, 8, 16, 32, 64


_SCRATCH = threading.local()


def item_slots(n_items: int) -> np.ndarray:
    """This thread's scratch for `generate_block`: int64 [>= n_items], all -1.

    Per thread because the kernels run with the GIL released, so two threads may be inside one at
    once; the kernels leave it all -1 again, so it is filled once per thread, not per call.
    """
    slots = getattr(_SCRATCH, "slots", None)
    if slots is None or len(slots) < n_items:
        slots = np.full(max(n_items, 1), -1, dtype=np.int64)
        _SCRATCH.slots = slots
    return slots


@njit(nogil=True, cache=True)
def _top_by_sum(
    keys: np.ndarray, values: np.ndarray, n: int, slot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sum `values` (float64, in input order) per key; the `n` keys with the largest sums, ties
    by key ascending, and their sums as float32: np.unique + bincount + stable argsort(-sum).

    `slot` is scratch indexed by key, all -1 on entry and on return.
    """
    if n <= 0 or len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    uniq = np.empty(len(keys), np.int64)
    sums = np.zeros(len(keys), np.float64)
    m = 0
    for j in range(len(keys)):
        g = slot[keys[j]]
        if g < 0:
            g = m
            slot[keys[j]] = m
            uniq[m] = keys[j]
            m += 1
        sums[g] += values[j]
    # one sort of a unique composite key: descending float32 sum, then ascending key
    order_keys = np.empty(m, np.uint64)
    totals = np.empty(m, np.float32)
    for g in range(m):
        slot[uniq[g]] = -1
        total = np.float32(sums[g])
        if total == 0:
            total = np.float32(0.0)  # -0.0 ties with 0.0, as in argsort(-totals)
        totals[g] = total
        order_keys[g] = (np.uint64(_descending_bits(total)) << np.uint64(32)) | np.uint64(uniq[g])
    best = np.argsort(order_keys)[:n]
    return uniq[:m][best], totals[best]


@njit(nogil=True, cache=True, inline="always")
def _descending_bits(x: np.float32) -> np.uint32:
    """A uint32 whose ascending order is `x`'s descending order (finite floats)."""
    bits = np.float32(x).view(np.uint32)
    ordered = bits ^ np.uint32(0xFFFFFFFF) if bits >> np.uint32(31) else bits | np.uint32(0x80000000)
    return np.uint32(0xFFFFFFFF) - ordered


@njit(nogil=True, cache=True)
def _recent_seeds(
    items: np.ndarray, weights: np.ndarray, tail: int, keep: int
) -> tuple[np.ndarray, np.ndarray]:
    """The last `tail` events newest first, summed per item (float64, newest first), the first
    `keep` distinct items by first appearance (the reference: tests/recsvc/test_candidates.py)."""
    start = max(0, len(items) - tail)
    n = len(items) - start
    seeds = np.empty(keep, np.int64)
    totals = np.zeros(keep, np.float64)
    found = 0
    # first pass: the distinct items in order of first appearance, newest first
    for j in range(n):
        item = items[len(items) - 1 - j]
        seen = False
        for s in range(found):
            if seeds[s] == item:
                seen = True
                break
        if not seen:
            if found == keep:
                continue
            seeds[found] = item
            found += 1
    # second pass: their sums, accumulated newest first like the bincount over the reversed tail
    for j in range(n):
        row = len(items) - 1 - j
        for s in range(found):
            if seeds[s] == items[row]:
                totals[s] += weights[row]
                break
    return seeds[:found], totals[:found].astype(np.float32)


@njit(nogil=True, cache=True, inline="always")
def _candidate_columns(
    n: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Uninitialised Candidates columns of length n: items, sources, ann_score, ann_rank,
    cooc_score, repeat_score, cf_rank."""
    return (
        np.empty(n, np.int32),
        np.empty(n, np.uint8),
        np.empty(n, np.float32),
        np.empty(n, np.float32),
        np.empty(n, np.float32),
        np.empty(n, np.float32),
        np.empty(n, np.float32),
    )


@njit(nogil=True, cache=True, inline="always")
def _propose(
    p_items: np.ndarray,
    p_bits: np.ndarray,
    p_scores: np.ndarray,
    p_pos: np.ndarray,
    n: int,
    items: np.ndarray,
    scores: np.ndarray,
    source: int,
) -> int:
    """Append one source list's proposals (item, bit, score, position in the list) at row n."""
    for j in range(len(items)):
        p_items[n] = items[j]
        p_bits[n] = source
        p_scores[n] = scores[j]
        p_pos[n] = j
        n += 1
    return n


@njit(nogil=True, cache=True)
def generate_block(
    ev_offsets: np.ndarray,
    ev_items: np.ndarray,
    ev_decayed: np.ndarray,
    cooc_indptr: np.ndarray,
    cooc_indices: np.ndarray,
    cooc_scores: np.ndarray,
    given_items: np.ndarray,
    given_scores: np.ndarray,
    lists: np.ndarray,
    list_offsets: np.ndarray,
    popular_items: np.ndarray,
    popular_scores: np.ndarray,
    n_repeat: int,
    n_cooc: int,
    seed_tail: int,
    n_seeds: int,
    max_candidates: int,
    slot: np.ndarray,
) -> tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
]:
    """Candidates of every user of a block, concatenated, and each user's row offsets.

    User u's history events are ev_offsets[u]:ev_offsets[u + 1] (chronological; `ev_decayed` is
    weight x recency decay per event). Its given lists are rows list_offsets[u]:list_offsets[u + 1]
    of `lists` (bit, start, end into given_items / given_scores), in SOURCE_PRIORITY order.
    Returns (items, sources, ann_score, ann_rank, cooc_score, repeat_score, cf_rank, offsets).
    `slot` (int64, one entry per item index, all -1) is scratch, left all -1 again; why scratch
    and not a per-call array: at 1M items, filling a fresh one would cost more than the rest.
    """
    n_users = len(ev_offsets) - 1
    out_offsets = np.zeros(n_users + 1, np.int64)
    capacity = n_users * max_candidates
    o_items, o_bits, o_ann, o_ann_rank, o_cooc, o_repeat, o_cf_rank = _candidate_columns(capacity)
    total = 0
    for u in range(n_users):
        e0, e1 = ev_offsets[u], ev_offsets[u + 1]
        items_u = ev_items[e0:e1]
        repeat_items, repeat_scores = _top_by_sum(
            items_u, ev_decayed[e0:e1].astype(np.float64), n_repeat, slot
        )
        seeds, seed_w = _recent_seeds(items_u, ev_decayed[e0:e1], seed_tail, n_seeds)
        n_rows = 0
        for s in range(len(seeds)):
            n_rows += cooc_indptr[seeds[s] + 1] - cooc_indptr[seeds[s]]
        neighbours = np.empty(n_rows, np.int64)
        weights = np.empty(n_rows, np.float64)
        r = 0
        for s in range(len(seeds)):
            for p in range(cooc_indptr[seeds[s]], cooc_indptr[seeds[s] + 1]):
                neighbours[r] = cooc_indices[p]
                weights[r] = cooc_scores[p] * seed_w[s]  # float32 product, then summed as float64
                r += 1
        cooc_items, cooc_totals = _top_by_sum(neighbours, weights, n_cooc, slot)

        # every proposal of this user in priority order: (item, bit, score, position in its list)
        l0, l1 = list_offsets[u], list_offsets[u + 1]
        size = len(repeat_items) + len(cooc_items) + len(popular_items)
        for li in range(l0, l1):
            size += lists[li, 2] - lists[li, 1]
        p_items = np.empty(size, np.int64)
        p_bits = np.empty(size, np.uint8)
        p_scores = np.empty(size, np.float32)
        p_pos = np.empty(size, np.float32)
        n = 0
        # per source: its given lists first, then the computed one (`merge` sorts stably, and
        # `generate` lists the caller's extras before the sources it computes)
        for source in (_SESSION, _QUERY, _REPEAT, _ANN, _CF, _COOC, _POPULAR):
            for li in range(l0, l1):
                if lists[li, 0] == source:
                    g0, g1 = lists[li, 1], lists[li, 2]
                    n = _propose(
                        p_items,
                        p_bits,
                        p_scores,
                        p_pos,
                        n,
                        given_items[g0:g1],
                        given_scores[g0:g1],
                        source,
                    )
            if source == _REPEAT:
                n = _propose(
                    p_items,
                    p_bits,
                    p_scores,
                    p_pos,
                    n,
                    repeat_items,
                    repeat_scores,
                    source,
                )
            elif source == _COOC:
                n = _propose(p_items, p_bits, p_scores, p_pos, n, cooc_items, cooc_totals, source)
            elif source == _POPULAR:
                n = _propose(
                    p_items,
                    p_bits,
                    p_scores,
                    p_pos,
                    n,
                    popular_items,
                    popular_scores,
                    source,
                )

        g_items, g_bits, g_ann, g_ann_rank, g_cooc, g_repeat, g_cf_rank = _candidate_columns(n)
        # the union: one row per item at its first proposal, OR of bits, last evidence per source
        m = 0
        for row in range(n):
            item = p_items[row]
            g = slot[item]
            if g < 0:
                g = m
                slot[item] = m
                g_items[m] = item
                g_bits[m] = 0
                g_ann[m] = np.nan
                g_ann_rank[m] = np.nan
                g_cooc[m] = np.nan
                g_repeat[m] = np.nan
                g_cf_rank[m] = np.nan
                m += 1
            bit = p_bits[row]
            g_bits[g] |= bit
            if bit == _ANN:
                g_ann[g] = p_scores[row]
                g_ann_rank[g] = p_pos[row]
            elif bit == _COOC:
                g_cooc[g] = p_scores[row]
            elif bit == _REPEAT:
                g_repeat[g] = p_scores[row]
            elif bit == _CF:
                g_cf_rank[g] = p_pos[row]
        for g in range(m):
            slot[g_items[g]] = -1
        kept = min(m, max_candidates)
        for g in range(kept):
            j = g
            o_items[total + j] = g_items[g]
            o_bits[total + j] = g_bits[g]
            o_ann[total + j] = g_ann[g]
            o_ann_rank[total + j] = g_ann_rank[g]
            o_cooc[total + j] = g_cooc[g]
            o_repeat[total + j] = g_repeat[g]
            o_cf_rank[total + j] = g_cf_rank[g]
        total += kept
        out_offsets[u + 1] = total
    return (
        o_items[:total],
        o_bits[:total],
        o_ann[:total],
        o_ann_rank[:total],
        o_cooc[:total],
        o_repeat[:total],
        o_cf_rank[:total],
        out_offsets,
    )


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def cold_pool_rows(
    pool: np.ndarray,
    pool_bounds: np.ndarray,
    cand_items: np.ndarray,
    cand_bounds: np.ndarray,
    vecs: np.ndarray,
    has_vec: np.ndarray,
    item_emb: np.ndarray,
    slot: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled; covered through recommend
    """The rows a block's cold pools add to its candidates: (items, scores, bounds), request r's
    rows bounds[r]:bounds[r+1].

    Request r's rows are the distinct items of pool[pool_bounds[r]:pool_bounds[r+1]] (-1 = none)
    that are not already among its candidates cand_items[cand_bounds[r]:cand_bounds[r+1]]. With a
    vector (has_vec[r]) each scores its inner product with vecs[r] and they come best first, ties
    by item; without one they come by item and score nan. The same rows as np.unique, np.isin and
    `retrieval.rescored` per request (the products summed in the kernel's order, not BLAS's), in
    one pass with the GIL released. `slot` is item-indexed scratch, all -1 on entry and on return.
    """
    n = len(pool_bounds) - 1
    items = np.empty(len(pool), np.int32)
    scores = np.empty(len(pool), np.float32)
    bounds = np.zeros(n + 1, np.int64)
    dim = item_emb.shape[1]
    m = 0
    for r in range(n):
        for j in range(cand_bounds[r], cand_bounds[r + 1]):
            slot[cand_items[j]] = 1
        start = m
        for j in range(pool_bounds[r], pool_bounds[r + 1]):
            item = pool[j]
            if item >= 0 and slot[item] < 0:
                slot[item] = 2
                items[m] = item
                m += 1
        for j in range(cand_bounds[r], cand_bounds[r + 1]):
            slot[cand_items[j]] = -1
        for j in range(start, m):
            slot[items[j]] = -1
        mine = items[start:m]
        mine.sort()
        if not has_vec[r]:
            scores[start:m] = np.nan
        else:
            vec = vecs[r]
            own = np.empty(m - start, np.float32)
            for j in range(m - start):
                row = item_emb[mine[j]]
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += row[d] * vec[d]
                own[j] = acc
            order = np.argsort(-own, kind="mergesort")  # stable: equal scores stay by item
            by_item = mine.copy()
            for j in range(m - start):
                items[start + j] = by_item[order[j]]
                scores[start + j] = own[order[j]]
        bounds[r + 1] = m
    return items[:m], scores[:m], bounds
