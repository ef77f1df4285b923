"""Reserved exposure for never-seen items: a few slots of the final list go to cold candidates.

An item nobody has interacted with has no behaviour counts, no co-occurrence and no ALS factor, so
the ranker (which leans on those) never puts it in front of anyone, it never collects the
interactions that would change that, and new stock stays invisible. Reserving a small share of the
list for the best cold candidates by text interest breaks the loop at a bounded cost to the top
positions (placing the slots from `first_position` on keeps the head of the list untouched).
"""

from __future__ import annotations

import math

import numpy as np


def cold_slot_count(k: int, share: float, first_position: int) -> int:
    """Slots reserved in a list of k: ceil(share x k), only at 0-based positions >= first_position."""
    if share <= 0 or k <= first_position:
        return 0
    return min(k - max(first_position, 0), math.ceil(share * k))


def slot_positions(k: int, n: int, first_position: int) -> np.ndarray:
    """n positions spread evenly over [first_position, k), the first at first_position."""
    first = max(first_position, 0)
    return first + (np.arange(n, dtype=np.int64) * (k - first)) // max(n, 1)


def with_cold_slots(
    order: np.ndarray, cold_score: np.ndarray, k: int, share: float, first_position: int
) -> np.ndarray:
    """`order` (candidate rows, best first) with the reserved slots of its first k given to cold rows.

    `cold_score[row]` is the text-interest score of a cold candidate and nan for every other row
    (warm items, or cold ones without a text score). Cold rows already in the top k count towards
    the quota and stay where the ranker put them; the remaining best cold rows by score (ties by
    their ranker order) take the slot positions in order. Every other row keeps its relative order,
    so nothing is dropped: filters applied to the candidates hold for the result.
    """
    n = cold_slot_count(k, share, first_position)
    order = np.asarray(order)
    if n == 0 or len(order) <= k:
        return order  # a list that fits in k already shows every candidate
    is_cold = np.isfinite(cold_score[order])
    needed = n - int(is_cold[:k].sum())
    later = np.flatnonzero(is_cold[k:]) + k
    if needed <= 0 or len(later) == 0:
        return order
    best = later[np.lexsort((later, -cold_score[order[later]].astype(np.float64)))][:needed]
    # the head keeps every cold row already in the top k and gives up its last warm rows
    warm_in_head = np.flatnonzero(~is_cold[:k])
    dropped = warm_in_head[len(warm_in_head) - len(best) :]
    head_mask = np.zeros(len(order), dtype=bool)
    head_mask[:k] = True
    head_mask[dropped] = False
    head = np.empty(k, dtype=order.dtype)
    positions = slot_positions(k, n, first_position)[n - len(best) :]
    slot = np.zeros(k, dtype=bool)
    slot[positions] = True
    head[positions] = order[best]
    head[~slot] = order[head_mask]
    tail_mask = ~head_mask
    tail_mask[best] = False
    return np.concatenate([head, order[tail_mask]])
