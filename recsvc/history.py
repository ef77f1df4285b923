"""Per-user interaction histories for serving: compact CSR arrays plus small online overlays.

Bulk histories (from the bundle) live in three flat arrays indexed by per-user offsets, so a
lookup is two dict/array reads and three slices. Users who receive online events get a private
copy of their (short) history in an overlay dict; the CSR arrays are never mutated, which keeps
reads from gRPC threads safe while the recommender appends under its lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsvc.catalog import Catalog


@dataclass(frozen=True)
class Event:
    """One interaction reported to the service (docs/ARCHITECTURE.md "Request path")."""

    user_id: str
    item_id: str
    event: str
    timestamp: int
    value: float | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class UserHistory:
    """One user's interactions in chronological order (item row indices into the catalogue)."""

    items: np.ndarray  # int32 [n]
    timestamps: np.ndarray  # int64 [n]
    weights: np.ndarray  # float32 [n]

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def empty() -> UserHistory:
        return _EMPTY

    def before(self, cutoff: int) -> UserHistory:
        """The part strictly before `cutoff` (used to replay a past point in time)."""
        n = int(np.searchsorted(self.timestamps, cutoff, side="left"))
        return self if n == len(self) else UserHistory(self.items[:n], self.timestamps[:n], self.weights[:n])

    def with_events(self, items: np.ndarray, timestamps: np.ndarray, weights: np.ndarray) -> UserHistory:
        """A new history with extra events merged in chronological order (stable for ties)."""
        all_ts = np.concatenate([self.timestamps, np.asarray(timestamps, dtype=np.int64)])
        order = np.argsort(all_ts, kind="stable")
        return UserHistory(
            np.concatenate([self.items, np.asarray(items, dtype=np.int32)])[order],
            all_ts[order],
            np.concatenate([self.weights, np.asarray(weights, dtype=np.float32)])[order],
        )


_EMPTY = UserHistory(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32))


@dataclass(frozen=True)
class HistoryRows:
    """Many users' histories concatenated: user u's events at offsets[u]:offsets[u + 1], each
    tagged with its user (`seg`) and that user's request time (`now`).

    Why: the batched request path (candidates.generate_many, features.build_features_many) works
    on every user's events at once, keyed by (user, item), instead of one small array per user.
    """

    offsets: np.ndarray  # int64 [n_users + 1]
    seg: np.ndarray  # int64 [n_events] user of each event
    items: np.ndarray  # int64 [n_events]
    timestamps: np.ndarray  # int64 [n_events]
    weights: np.ndarray  # float32 [n_events], as stored
    now: np.ndarray  # int64 [n_events]

    @classmethod
    def of(cls, histories: Sequence[UserHistory], nows: Sequence[int]) -> HistoryRows:
        lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        return cls(
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.repeat(np.arange(len(histories), dtype=np.int64), lengths),
            np.concatenate([h.items for h in histories]).astype(np.int64),
            np.concatenate([h.timestamps for h in histories]).astype(np.int64),
            np.concatenate([h.weights for h in histories]).astype(np.float32),
            np.repeat(np.asarray(nows, dtype=np.int64), lengths),
        )


class HistoryStore:
    """All users' histories; `get` is O(1) plus slicing, `append` touches one user only."""

    def __init__(
        self,
        user_ids: list[str],
        offsets: np.ndarray,
        items: np.ndarray,
        timestamps: np.ndarray,
        weights: np.ndarray,
        catalog: Catalog,
    ) -> None:
        self.catalog = catalog
        self._user_ids = list(user_ids)
        self._row = {u: i for i, u in enumerate(self._user_ids)}
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._items = np.asarray(items, dtype=np.int32)
        self._timestamps = np.asarray(timestamps, dtype=np.int64)
        self._weights = np.asarray(weights, dtype=np.float32)
        self._overlay: dict[str, UserHistory] = {}

    @classmethod
    def from_interactions(cls, interactions: pl.DataFrame, catalog: Catalog) -> HistoryStore:
        """Build from a canonical interactions frame (user_id, item_id, timestamp, weight).

        Rows whose item is not in the catalogue are dropped: serving cannot score them.
        """
        missing = {"user_id", "item_id", "timestamp", "weight"} - set(interactions.columns)
        if missing:
            raise ValueError(f"interactions frame lacks column(s): {', '.join(sorted(missing))}")
        item_idx = item_indices(interactions["item_id"], catalog)
        keep = item_idx >= 0
        frame = interactions.select("user_id", "timestamp", "weight").filter(pl.Series(keep))
        return cls.from_arrays(
            frame["user_id"].cast(pl.Utf8).to_numpy(),
            item_idx[keep],
            frame["timestamp"].to_numpy(),
            frame["weight"].to_numpy(),
            catalog,
        )

    @classmethod
    def from_arrays(
        cls,
        user_ids: np.ndarray,
        items: np.ndarray,
        timestamps: np.ndarray,
        weights: np.ndarray,
        catalog: Catalog,
    ) -> HistoryStore:
        """Group flat event arrays by user; each user's events sorted by time (ties keep input order)."""
        users, user_code = np.unique(np.asarray(user_ids, dtype=object), return_inverse=True)
        order = np.lexsort((np.asarray(timestamps), user_code))
        counts = np.bincount(user_code, minlength=len(users))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls(
            [str(u) for u in users],
            offsets,
            np.asarray(items)[order],
            np.asarray(timestamps)[order],
            np.asarray(weights)[order],
            catalog,
        )

    def get(self, user_id: str) -> UserHistory:
        """The user's history; empty for unknown users."""
        overlay = self._overlay.get(user_id)
        if overlay is not None:
            return overlay
        row = self._row.get(user_id)
        if row is None:
            return _EMPTY
        lo, hi = self._offsets[row], self._offsets[row + 1]
        return UserHistory(self._items[lo:hi], self._timestamps[lo:hi], self._weights[lo:hi])

    def append(self, user_id: str, item_idx: int, ts: int, weight: float) -> None:
        """Add one event; readers holding the previous UserHistory keep an unchanged copy."""
        current = self.get(user_id)
        self._overlay[user_id] = current.with_events(
            np.asarray([item_idx], np.int32), np.asarray([ts], np.int64), np.asarray([weight], np.float32)
        )

    def users(self) -> list[str]:
        """Every user with a history (bulk users first, then users first seen online)."""
        return self._user_ids + [u for u in self._overlay if u not in self._row]

    def __len__(self) -> int:
        return len(self._user_ids) + sum(1 for u in self._overlay if u not in self._row)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._row or user_id in self._overlay

    def save(self, path: str | Path) -> None:
        """Parquet with one row per event (item ids as strings so the file is self-describing)."""
        users = self.users()
        histories = [self.get(u) for u in users]
        lengths = np.asarray([len(h) for h in histories], dtype=np.int64)
        items = np.concatenate([h.items for h in histories]) if histories else np.zeros(0, np.int32)
        frame = pl.DataFrame(
            {
                "user_id": pl.Series(
                    np.repeat(np.asarray(users, dtype=object), lengths).tolist(), dtype=pl.Utf8
                ),
                "item_id": pl.Series(self.catalog.item_ids[items].tolist(), dtype=pl.Utf8),
                "timestamp": np.concatenate([h.timestamps for h in histories]) if histories else [],
                "weight": np.concatenate([h.weights for h in histories]) if histories else [],
            },
            schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "weight": pl.Float32},
        )
        frame.write_parquet(Path(path))

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog) -> HistoryStore:
        """Inverse of `save`; events of items missing from `catalog` are dropped."""
        return cls.from_interactions(pl.read_parquet(Path(path)), catalog)


def item_indices(item_ids: pl.Series, catalog: Catalog) -> np.ndarray:
    """Item id column -> int32 catalogue rows, -1 for ids the catalogue does not know."""
    lookup = pl.DataFrame(
        {
            "item_id": pl.Series(catalog.item_ids.tolist(), dtype=pl.Utf8),
            "_idx": np.arange(len(catalog), dtype=np.int32),
        }
    )
    joined = pl.DataFrame({"item_id": item_ids.cast(pl.Utf8)}).join(
        lookup, on="item_id", how="left", maintain_order="left"
    )
    return joined["_idx"].fill_null(-1).to_numpy().astype(np.int32)
