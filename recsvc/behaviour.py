"""Behaviour signals: per-item counters, item-item co-occurrence and per-user activity.

Everything is computed from interactions strictly before a reference time (`now`), which is
what makes offline ranker features leak-free, and can absorb new events online.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recsvc.config import DAY
from recsvc.history import UserHistory

# Windows (days) of the per-item weighted counts; the last column counts everything.
COUNT_WINDOWS_DAYS: tuple[float, ...] = (1.0, 7.0, 30.0)
COUNT_COLUMNS: tuple[str, ...] = ("1d", "7d", "30d", "all")
# Co-occurrence: events of one user at most this far apart (in their history) count as co-occurring.
COOC_MAX_GAP = 10
COOC_MAX_SECONDS = 3 * DAY


def decay(age_s: np.ndarray, half_life_days: float) -> np.ndarray:
    """Exponential recency weight: 1 now, 0.5 after one half-life (future ages clamp to 1)."""
    age = np.maximum(np.asarray(age_s, dtype=np.float64), 0.0)
    return np.exp2(-age / (half_life_days * DAY)).astype(np.float32)


@dataclass
class ItemStats:
    """Per-item behaviour counters at reference time `now` (row i = catalogue item i)."""

    now: int
    counts: np.ndarray  # float32 [n, 4] weighted counts in COUNT_COLUMNS windows
    popularity: np.ndarray  # float32 [n] weighted count in the popularity window
    users: np.ndarray  # float32 [n] distinct users
    repeat_users: np.ndarray  # float32 [n] users with >= 2 interactions with the item
    first_ts: np.ndarray  # float64 [n] first interaction time, nan = never seen
    last_ts: np.ndarray  # float64 [n] last interaction time, nan = never seen
    popularity_window_days: float = 7.0
    _popular_cache: tuple[int, np.ndarray] | None = None  # (depth computed, items)
    # (row function, table) from `derived_table`; refreshed row by row in `update`
    _derived: tuple[Callable[[ItemStats, np.ndarray], np.ndarray], np.ndarray] | None = None
    _version: int = 0  # bumped by every update, so a table built during one is not kept
    _derived_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # isnan(first_ts), read-only; replaced (not mutated) when an item gets its first event
    _never_seen: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return len(self.users)

    @classmethod
    def from_interactions(
        cls,
        item_idx: np.ndarray,
        user_idx: np.ndarray,
        ts: np.ndarray,
        weights: np.ndarray,
        n_items: int,
        now: int,
        popularity_window_days: float = 7.0,
    ) -> ItemStats:
        """Counters from events strictly before `now` (later rows are ignored, never counted)."""
        item_idx, user_idx, ts, weights = _before(now, item_idx, user_idx, ts, weights)
        counts = np.zeros((n_items, len(COUNT_COLUMNS)), dtype=np.float32)
        age = now - ts
        for j, days in enumerate(COUNT_WINDOWS_DAYS):
            inside = age <= days * DAY
            counts[:, j] = np.bincount(item_idx[inside], weights[inside], minlength=n_items)
        counts[:, -1] = np.bincount(item_idx, weights, minlength=n_items)
        in_pop = age <= popularity_window_days * DAY
        popularity = np.bincount(item_idx[in_pop], weights[in_pop], minlength=n_items).astype(np.float32)
        stride = int(user_idx.max()) + 1 if len(user_idx) else 1
        pair_ids, pair_counts = np.unique(item_idx * stride + user_idx, return_counts=True)
        pair_items = pair_ids // stride
        users = np.bincount(pair_items, minlength=n_items).astype(np.float32)
        repeat_users = np.bincount(pair_items[pair_counts >= 2], minlength=n_items).astype(np.float32)
        first_ts = np.full(n_items, np.inf)
        np.minimum.at(first_ts, item_idx, ts.astype(np.float64))
        last_ts = np.full(n_items, -np.inf)
        np.maximum.at(last_ts, item_idx, ts.astype(np.float64))
        first_ts[~np.isfinite(first_ts)] = np.nan
        last_ts[~np.isfinite(last_ts)] = np.nan
        return cls(
            int(now), counts, popularity, users, repeat_users, first_ts, last_ts, popularity_window_days
        )

    def update(self, item_idx: int, ts: int, weight: float, user_prior_count: int) -> None:
        """Absorb one online event; `user_prior_count` = times this user had the item before.

        Window counts are not aged out as the clock moves on (they are rebuilt with each bundle);
        first/last-seen times and user counts are exact.
        """
        self.counts[item_idx, :] += np.float32(weight)
        self.popularity[item_idx] += np.float32(weight)
        if user_prior_count == 0:
            self.users[item_idx] += 1
        elif user_prior_count == 1:
            self.repeat_users[item_idx] += 1
        if np.isnan(self.first_ts[item_idx]) or ts < self.first_ts[item_idx]:
            mask = self._never_seen
            if mask is not None and mask[item_idx]:
                mask = mask.copy()  # readers keep the snapshot they hold
                mask[item_idx] = False
                mask.flags.writeable = False
                self._never_seen = mask
            self.first_ts[item_idx] = ts
        if np.isnan(self.last_ts[item_idx]) or ts > self.last_ts[item_idx]:
            self.last_ts[item_idx] = ts
        self.now = max(self.now, int(ts))
        self._popular_cache = None
        with self._derived_lock:
            self._version += 1
            if self._derived is not None:
                row_fn, table = self._derived
                table[item_idx] = row_fn(self, np.asarray([item_idx]))[0]

    def derived_table(self, row_fn: Callable[[ItemStats, np.ndarray], np.ndarray]) -> np.ndarray:
        """`row_fn(self, rows)` for every item, computed once and kept current by `update`.

        Why: per-item values derived from these counters (features.item_stat_rows) would otherwise
        be recomputed for every candidate of every request. A table built while an update ran is
        returned but not kept, so a later call never sees a stale row.
        """
        cached = self._derived
        if cached is not None and cached[0] is row_fn:
            return cached[1]
        version = self._version
        table = row_fn(self, np.arange(self.n_items))
        with self._derived_lock:
            if version == self._version:
                self._derived = (row_fn, table)
        return table

    def never_seen(self) -> np.ndarray:
        """Read-only bool [n_items]: items nobody interacted with yet (`np.isnan(first_ts)`).

        Why: the cold-start slots need this mask for every batch (and the cold pool per request);
        `np.isnan` over the catalogue is O(items), ~0.4 ms a call at 1M items. Cached here and
        replaced by `update` when an item gets its first event, so it always equals the isnan.
        """
        mask = self._never_seen
        if mask is None:
            mask = np.isnan(self.first_ts)
            mask.flags.writeable = False
            self._never_seen = mask
        return mask

    def top_popular(self, n: int) -> np.ndarray:
        """The `n` items with the highest recent popularity (int32, best first, only items seen)."""
        cached = self._popular_cache
        if cached is None or cached[0] < min(n, self.n_items):
            k = min(max(n, 1000), self.n_items)
            part = np.argpartition(-self.popularity, k - 1)[:k] if k < self.n_items else np.arange(k)
            part = part[np.lexsort((part, -self.popularity[part]))]
            cached = (k, part[self.popularity[part] > 0].astype(np.int32))
            self._popular_cache = cached
        return cached[1][:n]

    def save(self, path: str | Path) -> None:
        np.savez(
            Path(path),
            now=np.int64(self.now),
            counts=self.counts,
            popularity=self.popularity,
            users=self.users,
            repeat_users=self.repeat_users,
            first_ts=self.first_ts,
            last_ts=self.last_ts,
            popularity_window_days=np.float64(self.popularity_window_days),
        )

    @classmethod
    def load(cls, path: str | Path) -> ItemStats:
        with np.load(Path(path)) as z:
            return cls(
                int(z["now"]),
                z["counts"].astype(np.float32),
                z["popularity"].astype(np.float32),
                z["users"].astype(np.float32),
                z["repeat_users"].astype(np.float32),
                z["first_ts"].astype(np.float64),
                z["last_ts"].astype(np.float64),
                float(z["popularity_window_days"]),
            )


@dataclass
class CoOccurrence:
    """Top co-occurring items per item (CSR rows sorted by score, cosine-normalised)."""

    indptr: np.ndarray  # int64 [n_items + 1]
    indices: np.ndarray  # int32 [nnz]
    scores: np.ndarray  # float32 [nnz]

    @property
    def n_items(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_interactions(
        cls,
        item_idx: np.ndarray,
        user_idx: np.ndarray,
        ts: np.ndarray,
        weights: np.ndarray,
        n_items: int,
        now: int,
        neighbours: int = 50,
        half_life_days: float = 7.0,
    ) -> CoOccurrence:
        """Items bought/viewed close together by the same user (within COOC_MAX_GAP events and
        COOC_MAX_SECONDS), each pair weighted by the geometric mean of the two events' weights and
        by recency; then cosine normalisation by each item's total weighted occurrence so that
        blockbusters do not become everyone's neighbour. Events at/after `now` are ignored.
        """
        item_idx, user_idx, ts, weights = _before(now, item_idx, user_idx, ts, weights)
        order = np.lexsort((ts, user_idx))
        items, users, times = item_idx[order], user_idx[order], ts[order]
        w = weights[order] * decay(now - times, half_life_days)
        rows, cols, vals = [], [], []
        for gap in range(1, COOC_MAX_GAP + 1):
            a, b = slice(0, len(items) - gap), slice(gap, len(items))
            ok = (users[a] == users[b]) & (times[b] - times[a] <= COOC_MAX_SECONDS) & (items[a] != items[b])
            if not ok.any():
                break
            pair_w = np.sqrt(w[a][ok] * w[b][ok])
            rows += [items[a][ok], items[b][ok]]
            cols += [items[b][ok], items[a][ok]]
            vals += [pair_w, pair_w]
        if not rows:
            return cls(np.zeros(n_items + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
        matrix = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items)
        )
        matrix.sum_duplicates()
        norm = np.sqrt(np.bincount(items, w, minlength=n_items)).astype(np.float64)
        norm[norm == 0] = 1.0
        coo = matrix.tocoo()
        sims = coo.data / (norm[coo.row] * norm[coo.col])
        return cls._top_k(coo.row, coo.col, sims, n_items, neighbours)

    @classmethod
    def _top_k(
        cls, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, n_items: int, k: int
    ) -> CoOccurrence:
        """Keep the k best neighbours per row, sorted by score (ties by item index)."""
        order = np.lexsort((cols, -sims, rows))
        rows, cols, sims = rows[order], cols[order], sims[order]
        starts = np.searchsorted(rows, np.arange(n_items), side="left")
        rank = np.arange(len(rows)) - starts[rows]
        keep = rank < k
        counts = np.bincount(rows[keep], minlength=n_items)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, cols[keep].astype(np.int32), sims[keep].astype(np.float32))

    def neighbours(self, item_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour item indices int32, scores float32), best first."""
        lo, hi = self.indptr[item_idx], self.indptr[item_idx + 1]
        return self.indices[lo:hi], self.scores[lo:hi]

    def save(self, path: str | Path) -> None:
        np.savez(Path(path), indptr=self.indptr, indices=self.indices, scores=self.scores)

    @classmethod
    def load(cls, path: str | Path) -> CoOccurrence:
        with np.load(Path(path)) as z:
            return cls(
                z["indptr"].astype(np.int64), z["indices"].astype(np.int32), z["scores"].astype(np.float32)
            )


# Per-user behaviour features, in this order (features.py prefixes them with "user_").
USER_FEATURE_NAMES: tuple[str, ...] = (
    "n_events",
    "weight_sum",
    "events_7d",
    "days_since_last",
    "days_active",
    "distinct_item_share",
    "attribute_diversity",
)


def user_behaviour(history: UserHistory, now: int, attribute_codes: np.ndarray | None = None) -> np.ndarray:
    """Activity, recency and diversity of one user (float32 [len(USER_FEATURE_NAMES)], nan if empty).

    `attribute_codes` (the catalogue codes of one attribute, e.g. category) gives the diversity:
    distinct values in the history / events, so a focused shopper scores low.

    This is the definition; `features.build_features_many` computes it for a block of users with
    the compiled `feature_kernels.user_activity` (the tests check they agree bit for bit).
    """
    n = len(history)
    if n == 0:
        out = np.full(len(USER_FEATURE_NAMES), np.nan, dtype=np.float32)
        out[:3] = 0.0  # no activity is a fact, not a missing value
        return out
    ts = history.timestamps
    distinct_items = len(np.unique(history.items))
    if attribute_codes is not None:
        codes = attribute_codes[history.items]
        diversity = len(np.unique(codes[codes >= 0])) / n
    else:
        diversity = np.nan
    return np.asarray(
        [
            n,
            float(history.weights.sum()),
            float(np.count_nonzero(now - ts <= 7 * DAY)),
            (now - int(ts[-1])) / DAY,
            len(np.unique(ts // DAY)),
            distinct_items / n,
            diversity,
        ],
        dtype=np.float32,
    )


def _before(
    now: int, item_idx: np.ndarray, user_idx: np.ndarray, ts: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated arrays restricted to events strictly before `now` (the leakage guard)."""
    item_idx = np.asarray(item_idx, dtype=np.int64)
    user_idx = np.asarray(user_idx, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float32)
    if not (len(item_idx) == len(user_idx) == len(ts) == len(weights)):
        raise ValueError("item_idx, user_idx, ts and weights must have the same length")
    keep = ts < now
    return item_idx[keep], user_idx[keep], ts[keep], weights[keep]
