"""The last step of a Recommend, compiled for a whole block: which candidate rows a request shows.

Per request: rank the scored candidates best first (ties by item, `retrieval.best_first`), give the
reserved cold-start slots to never-seen candidates (`cold_slots.with_cold_slots`), apply the
diversity cap (at most `cap` items per attribute value) and keep k rows.

Why compiled: those are a lexsort, a dozen small numpy calls and a Python loop per request, ~0.04
ms holding the GIL, a tenth of a serving request's compute at 10k items. Most requests show k
of ~500 candidates and have no cap, so the kernel selects the top k (a partition, then a sort of
~k rows) instead of sorting all of them; with a cap, or scores with nan, it sorts every row as the
definition does. The numpy functions stay the definition; the tests check the kernel against them
row for row.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _sorted_rows(neg: np.ndarray, items: np.ndarray, rows: np.ndarray) -> np.ndarray:  # pragma: no cover
    """`rows` ordered by (neg score, item) ascending, nan last: np.lexsort((items, neg))."""
    by_item = rows[np.argsort(items[rows])]
    return by_item[np.argsort(neg[by_item], kind="mergesort")]


@njit(nogil=True, cache=True)
def _top_rows(neg: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:  # pragma: no cover
    """The first k of `_sorted_rows(neg, items, all rows)`, for nan-free `neg` and k < len(neg):
    the k-th key by a partition, then a sort of the rows at or before it only."""
    kth = np.partition(neg, k - 1)[k - 1]
    rows = np.flatnonzero(neg <= kth)
    return _sorted_rows(neg, items, rows)[:k]


@njit(nogil=True, cache=True)
def _with_cold_slots(
    order: np.ndarray, neg: np.ndarray, items: np.ndarray, cold: np.ndarray, k: int, n: int, first: int
) -> np.ndarray:  # pragma: no cover
    """The first k rows of `cold_slots.with_cold_slots(full order, cold, ...)`, given `order`,
    either the full order or just its first k rows.

    The cold rows past the first k are taken from every row not in `order[:k]`, best cold score
    first, ties by their place in the full order, i.e. by (neg score, item).
    """
    m = len(neg)
    head = order[:k]
    is_cold = np.isfinite(cold[head])
    needed = n - int(is_cold.sum())
    if needed <= 0:
        return head
    in_head = np.zeros(m, np.bool_)
    in_head[head] = True
    later = np.empty(m, np.int64)
    n_later = 0
    for row in range(m):
        if not in_head[row] and np.isfinite(cold[row]):
            later[n_later] = row
            n_later += 1
    later = later[:n_later]
    if len(later) == 0:
        return head
    later = _sorted_rows(neg, items, later)  # the full order's order, for the ties below
    best = later[np.argsort(-cold[later].astype(np.float64), kind="mergesort")][:needed]
    warm_in_head = np.flatnonzero(~is_cold)
    dropped = np.zeros(k, np.bool_)
    dropped[warm_in_head[len(warm_in_head) - len(best) :]] = True
    slot = np.zeros(k, np.bool_)
    out = np.empty(k, np.int64)
    for j in range(n - len(best), n):
        position = first + (j * (k - first)) // n
        slot[position] = True
        out[position] = best[j - (n - len(best))]
    kept = 0
    for j in range(k):
        if not slot[j]:
            while dropped[kept]:
                kept += 1
            out[j] = head[kept]
            kept += 1
    return out


@njit(nogil=True, cache=True)
def _capped(
    order: np.ndarray, items: np.ndarray, codes: np.ndarray, cap: int, k: int, taken: np.ndarray
) -> np.ndarray:  # pragma: no cover
    """Greedy diversity cap: the first k rows of `order` whose attribute value (codes[item], -1 =
    none, never capped) has not yet been shown `cap` times. `taken` is per-code scratch, all 0 on
    entry and on return."""
    out = np.empty(min(k, len(order)), np.int64)
    m = 0
    for row in order:
        code = codes[items[row]]
        if code >= 0:
            if taken[code] >= cap:
                continue
            taken[code] += 1
        out[m] = row
        m += 1
        if m == k:
            break
    for j in range(m):
        code = codes[items[out[j]]]
        if code >= 0:
            taken[code] = 0
    return out[:m]


@njit(nogil=True, cache=True)
def final_rows(
    scores: np.ndarray,
    items: np.ndarray,
    cold: np.ndarray,
    bounds: np.ndarray,
    ks: np.ndarray,
    slots: np.ndarray,
    first_position: int,
    codes: np.ndarray,
    cap: int,
    taken: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled; covered through recommend
    """(rows, out_bounds): request r shows its candidate rows rows[out_bounds[r]:out_bounds[r+1]]
    (0-based within its segment bounds[r]:bounds[r+1]), in the order shown.

    scores (float64) and items are the candidates' ranker scores and item indices; cold is a
    never-seen candidate's cold-slot score and nan for every other row; ks[r] the list length and
    slots[r] its reserved cold slots (`cold_slots.cold_slot_count`); cap <= 0 means no diversity
    cap, else codes (per item) are the capped attribute's values and taken is zeroed scratch with
    one entry per value.
    """
    n_req = len(bounds) - 1
    out = np.empty(int(ks.sum()), np.int64)
    out_bounds = np.zeros(n_req + 1, np.int64)
    m = 0
    for r in range(n_req):
        a, b = bounds[r], bounds[r + 1]
        k = ks[r]
        neg = -scores[a:b]
        own = items[a:b]
        if b - a > k and cap <= 0 and not np.isnan(neg).any():
            order = _top_rows(neg, own, k)
        else:
            order = _sorted_rows(neg, own, np.arange(b - a))
        if slots[r] > 0 and b - a > k:
            head = _with_cold_slots(order, neg, own, cold[a:b], k, slots[r], first_position)
            if cap > 0:  # the cap reads on past k: the full order's other rows follow the head
                in_head = np.zeros(b - a, np.bool_)
                in_head[head] = True
                order = np.concatenate((head, order[~in_head[order]]))
            else:
                order = head
        shown = _capped(order, own, codes, cap, k, taken) if cap > 0 else order[:k]
        out[m : m + len(shown)] = shown
        m += len(shown)
        out_bounds[r + 1] = m
    return out[:m], out_bounds
