"""Nearest never-seen items of catalogue items, searched once per item and reused.

The cold-start slots (`recsvc.cold_slots`) are filled from a pool: for each of a request's recent
history items, the never-seen items nearest to it (a filtered FAISS search). Popular items sit in
many users' histories, so a batch job (and a busy server) searches the same items over and over:
on the 100k-item benchmark bundle that search was a third of `recsvc-batch`'s time. Neighbour
lists depend only on the item, the index and the never-seen mask, so they are cached per item
and thrown away as soon as the mask changes (an item's first event takes it out of the pool).

Every list is searched at the same fixed depth, whichever request asks first, so a request's pool
never depends on what was asked before it or beside it: batched and single answers stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsvc.retrieval import ItemIndex

# Neighbours kept per item: the cold slots of the longest allowed list (5% of max_k 200 = 10)
# plus room for a few excluded never-seen items; deeper needs search uncached.
COLD_NEIGHBOURS_DEPTH = 16
# Items whose lists are kept at most (~260 bytes each with the array and dict overhead: ~52 MB);
# the cache restarts beyond it. Popular history items, the ones asked for again, come back first.
MAX_CACHED_ITEMS = 200_000


@dataclass
class _Lists:
    """Neighbour lists valid for one never-seen mask (a new mask object means a new state)."""

    mask: np.ndarray
    by_item: dict[int, np.ndarray] = field(default_factory=dict)


class ColdNeighbours:
    """`lists(items)`: each item's COLD_NEIGHBOURS_DEPTH nearest never-seen items, best first.

    Thread-safe without a lock: a state is replaced whole when the mask changes, and a list written
    into a replaced state is simply never read again.
    """

    def __init__(self, index: ItemIndex, item_emb: np.ndarray, effort: float) -> None:
        self.index = index
        self.item_emb = item_emb
        self.effort = effort
        self._state = _Lists(np.zeros(0, dtype=bool))

    def lists(self, items: np.ndarray, never_seen: np.ndarray) -> dict[int, np.ndarray]:
        """{item: its nearest never-seen items (int32 ids, at most COLD_NEIGHBOURS_DEPTH)} for
        every distinct item in `items`; one FAISS search for those not cached yet."""
        state = self._state
        if state.mask is not never_seen:
            state = _Lists(never_seen)
            self._state = state
        found = {i: state.by_item.get(i) for i in np.unique(np.asarray(items, dtype=np.int64)).tolist()}
        missing = [i for i, row in found.items() if row is None]
        if missing:
            if len(state.by_item) + len(missing) > MAX_CACHED_ITEMS:
                state.by_item.clear()
            _, ids = self.index.search_with_filter(
                self.item_emb[missing],
                COLD_NEIGHBOURS_DEPTH,
                allowed=never_seen,
                effort=self.effort,
            )
            for item, row in zip(missing, np.asarray(ids)):
                found[item] = state.by_item[item] = row[row >= 0].astype(np.int32)
        return found  # type: ignore[return-value]  # every None was filled above
