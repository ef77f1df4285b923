"""Durable, append-only store of live interaction events (SQLite in WAL mode).

`append` commits (with `synchronous=FULL`) before it returns, so an event the service has
acknowledged survives a crash or restart. On start-up and on every bundle swap the service
replays the events newer than the bundle's data into its in-memory Recommender, which is how
live behaviour carries across restarts and model versions.

Every event gets a monotonically increasing sequence number (`seq`), which lets a loader
replay "everything up to now" and then catch up exactly the events that arrived meanwhile.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from recsvc.durable_sqlite import open_durable
from recsvc.history import Event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    value REAL,
    request_id TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (timestamp, seq);
"""
_COLUMNS = "seq, user_id, item_id, event, timestamp, value, request_id"


class EventStoreError(Exception):
    """The event database cannot be opened or written (path named in the message)."""


class EventStore:
    """Append-only event log; thread-safe (one connection guarded by a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._conn = open_durable(self.path, _SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise EventStoreError(f"cannot open event store {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def append(self, events: Sequence[Event]) -> int:
        """Write all events in one transaction; returns the sequence number of the last one.

        Either every event is stored or none is (the transaction rolls back on error).
        """
        if not events:
            return self.last_seq()
        rows = [_to_row(e) for e in events]
        now = time.time()
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT INTO events (user_id, item_id, event, timestamp, value, request_id, received_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*row, now) for row in rows],
                )
                seq = int(self._conn.execute("SELECT last_insert_rowid()").fetchone()[0])
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):  # a closed connection cannot even roll back
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                raise EventStoreError(f"cannot write to event store {self.path}: {exc}") from exc
        return seq

    def since(self, ts: int, after_seq: int = 0, up_to_seq: int | None = None) -> list[Event]:
        """Events with `timestamp >= ts`, `seq > after_seq` (and `seq <= up_to_seq`), chronological,
        ties by arrival."""
        upper = 2**62 if up_to_seq is None else int(up_to_seq)
        with self._lock:
            cur = self._conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE timestamp >= ? AND seq > ? AND seq <= ?"
                " ORDER BY timestamp, seq",
                (int(ts), int(after_seq), upper),
            )
            rows = cur.fetchall()
        return [_from_row(r) for r in rows]

    def after(self, seq: int) -> list[tuple[int, Event]]:
        """Every event with a sequence number above `seq`, in arrival (seq) order.

        Why: several server processes append to one store; each catches up on the others'
        events in the order they were acknowledged, whatever their timestamps.
        """
        with self._lock:
            cur = self._conn.execute(f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq", (int(seq),))
            rows = cur.fetchall()
        return [(int(r[0]), _from_row(r)) for r in rows]

    def all(self) -> list[Event]:
        """Every stored event, chronological."""
        return self.since(-(2**62))

    def last_seq(self) -> int:
        """Sequence number of the newest event (0 when empty)."""
        with self._lock:
            row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(row[0])

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_row(e: Event) -> tuple[str, str, str, int, float | None, str | None]:
    value = None if e.value is None else float(e.value)
    if value is not None and not math.isfinite(value):
        raise EventStoreError(
            f"event value must be finite, got {value} (user {e.user_id!r}, item {e.item_id!r})"
        )
    return (e.user_id, e.item_id, e.event, int(e.timestamp), value, e.request_id)


def _from_row(r: tuple) -> Event:
    return Event(user_id=r[1], item_id=r[2], event=r[3], timestamp=int(r[4]), value=r[5], request_id=r[6])
