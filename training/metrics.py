"""Ranking metrics over recommendation lists, computed on a hit matrix so they vectorise.

Everything starts from two arrays per evaluated user:

* ``hits``: ``bool[n_users, K]``, ``hits[u, r]`` is True when the item at rank ``r + 1`` of user
  ``u``'s list is relevant (held out). Lists shorter than ``K`` are padded with misses.
* ``n_relevant``: ``int[n_users]``, how many distinct relevant items the user has.

Each metric returns one value per user (so callers can average, segment or bootstrap); a
per-user value is undefined when the user has no relevant item, and callers skip such users.
Definitions follow the H&M Kaggle competition: binary gains, AP@K and NDCG@K normalised by
what a perfect list of length K could reach, i.e. ``min(|relevant|, K)`` relevant items.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

PAD = -1  # item index used to pad recommendation lists shorter than K


def hits_from_lists(recommended: Sequence[Sequence[str]], relevant: Sequence[Collection[str]]) -> np.ndarray:
    """Hit matrix for small, explicit cases (tests, debugging); lists are padded to the longest."""
    if len(recommended) != len(relevant):
        raise ValueError(f"got {len(recommended)} recommendation lists but {len(relevant)} relevant sets")
    width = max((len(r) for r in recommended), default=0)
    hits = np.zeros((len(recommended), width), dtype=bool)
    for u, (recs, rel) in enumerate(zip(recommended, relevant)):
        rel_set = set(rel)
        hits[u, : len(recs)] = [item in rel_set for item in recs]
    return hits


def relevance_keys(user_rows: np.ndarray, item_idx: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique int64 keys ``row * n_items + item`` that make set membership a binary search."""
    keys = user_rows.astype(np.int64) * np.int64(n_items) + item_idx.astype(np.int64)
    return np.unique(keys)


def hits_from_indices(recs: np.ndarray, relevant_keys: np.ndarray, n_items: int) -> np.ndarray:
    """Hit matrix for ``recs`` (``int[n_users, K]`` item indices, ``PAD`` for none), row = user row.

    ``relevant_keys`` comes from `relevance_keys` with the same row numbering. Tens of thousands of
    users times K=200 is a few million binary searches, well under a second.
    """
    if recs.ndim != 2:
        raise ValueError(f"recs must be a 2-D [users, K] array, got shape {recs.shape}")
    rows = np.arange(recs.shape[0], dtype=np.int64)[:, None]
    keys = rows * np.int64(n_items) + recs.astype(np.int64)
    if relevant_keys.size == 0:
        return np.zeros(recs.shape, dtype=bool)
    pos = np.searchsorted(relevant_keys, keys)
    pos = np.minimum(pos, relevant_keys.size - 1)
    return (relevant_keys[pos] == keys) & (recs != PAD)


def _check(hits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if hits.ndim != 2:
        raise ValueError(f"hits must be a 2-D [users, K] array, got shape {hits.shape}")
    top = hits[:, :k]
    if top.shape[1] < k:  # shorter lists: the missing ranks are misses
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])))
    return top


def _as_counts(n_relevant: np.ndarray | Sequence[int]) -> np.ndarray:
    counts = np.asarray(n_relevant, dtype=np.float64)
    if np.any(counts <= 0):
        raise ValueError("every evaluated user needs at least one relevant item (n_relevant > 0)")
    return counts


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray | Sequence[int], k: int) -> np.ndarray:
    """Share of the user's relevant items found in the top k: hits / |relevant|."""
    return _check(hits, k).sum(axis=1) / _as_counts(n_relevant)


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Share of the top k that is relevant: hits / k (short lists are not rewarded)."""
    return _check(hits, k).sum(axis=1) / float(k)


def hit_rate_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """1.0 when at least one relevant item is in the top k, else 0.0."""
    return _check(hits, k).any(axis=1).astype(np.float64)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray | Sequence[int], k: int) -> np.ndarray:
    """DCG with binary gains 1/log2(rank+1), over the DCG of min(|relevant|, k) hits at the top."""
    top = _check(hits, k)
    counts = _as_counts(n_relevant)
    disc = _discounts(k)
    dcg = top @ disc
    ideal_cum = np.concatenate([[0.0], np.cumsum(disc)])
    idcg = ideal_cum[np.minimum(counts, k).astype(np.int64)]
    return dcg / idcg


def average_precision_at_k(hits: np.ndarray, n_relevant: np.ndarray | Sequence[int], k: int) -> np.ndarray:
    """AP@k as in the H&M competition: sum of precision@r at each hit rank r, over min(|rel|, k)."""
    top = _check(hits, k).astype(np.float64)
    counts = _as_counts(n_relevant)
    precision_at_rank = np.cumsum(top, axis=1) / np.arange(1, k + 1, dtype=np.float64)
    return (precision_at_rank * top).sum(axis=1) / np.minimum(counts, k)


def map_at_k(hits: np.ndarray, n_relevant: np.ndarray | Sequence[int], k: int = 12) -> float:
    """Mean of AP@k over users (MAP@12 is the H&M competition metric)."""
    ap = average_precision_at_k(hits, n_relevant, k)
    return float(ap.mean()) if ap.size else float("nan")


def catalogue_coverage(recs: np.ndarray, k: int, catalogue_size: int) -> float:
    """Distinct items recommended in anyone's top k, as a share of the whole catalogue."""
    if catalogue_size <= 0:
        raise ValueError(f"catalogue_size must be positive, got {catalogue_size}")
    top = recs[:, :k]
    distinct = np.unique(top[top != PAD])
    return distinct.size / float(catalogue_size)


def cold_start_recall(
    recs: np.ndarray,
    relevant_rows: np.ndarray,
    relevant_items: np.ndarray,
    cold_items: np.ndarray,
    n_items: int,
    k: int,
) -> tuple[float, int]:
    """Recall restricted to held-out items that had no train interaction ("cold" items).

    ``relevant_rows``/``relevant_items`` list the (user row, item index) held-out pairs, rows
    numbered like ``recs``; ``cold_items`` is a bool mask over the catalogue. Returns the mean
    per-user recall over users holding out at least one cold item, and that user count (the
    value is NaN when no user did).
    """
    cold_pair = cold_items[relevant_items]
    rows = relevant_rows[cold_pair]
    items = relevant_items[cold_pair]
    if rows.size == 0:
        return float("nan"), 0
    keys = relevance_keys(rows, items, n_items)
    hits = hits_from_indices(recs[:, :k], keys, n_items)
    users, counts = np.unique(keys // np.int64(n_items), return_counts=True)
    recall = hits[users].sum(axis=1) / counts
    return float(recall.mean()), int(users.size)
