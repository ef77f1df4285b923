"""Durable log of what each experiment variant showed, and attribution of events to it.

An A/B test is only as good as its exposure log: a metric per variant needs to know which
variant served which items to whom. `ExposureLog.append` commits (SQLite WAL,
`synchronous=FULL`) before it returns, so a logged exposure survives a crash. User ids are
stored only as a keyed hash (`pseudonymise`), so the log can be shared for analysis without the
raw ids; events are joined to exposures by `request_id` or, failing that, by
(pseudonymised user, item, time window) in `attribute`.

Long ("one row per shown item") frame, used for parquet export and by the report:
`request_id, user_key, experiment, variant, model_version, ts, item_id, position, origin`
(an exposure that showed nothing keeps one row with null item_id/position/origin so it still
counts in the denominator). `origin` names the variant whose ranking contributed the item; for
interleaved exposures it is the drafting team, which is how clicks are credited.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import polars as pl

from recsvc.durable_sqlite import open_durable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exposures (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    user_key TEXT NOT NULL,
    experiment TEXT NOT NULL,
    variant TEXT NOT NULL,
    model_version TEXT NOT NULL,
    ts INTEGER NOT NULL,
    items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS exposures_by_time ON exposures (ts);
"""

EXPOSURE_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.Utf8(),
    "user_key": pl.Utf8(),
    "experiment": pl.Utf8(),
    "variant": pl.Utf8(),
    "model_version": pl.Utf8(),
    "ts": pl.Int64(),
    "item_id": pl.Utf8(),
    "position": pl.Int32(),
    "origin": pl.Utf8(),
}


class ExposureLogError(Exception):
    """The exposure database cannot be opened, read or written (path named in the message)."""


class ShownItem(NamedTuple):
    item_id: str
    position: int  # 1 = top of the list
    origin: str  # variant (or interleaving team) that put the item there


@dataclass(frozen=True)
class Exposure:
    """One served list: who (pseudonymised) saw which items from which variant, and when."""

    request_id: str
    user_key: str
    experiment: str
    variant: str
    items: tuple[ShownItem, ...]
    model_version: str
    ts: int  # epoch seconds, same clock as event timestamps

    def __post_init__(self) -> None:
        # Accept plain (item_id, position, origin) tuples from callers.
        object.__setattr__(self, "items", tuple(ShownItem(str(i), int(p), str(o)) for i, p, o in self.items))


def pseudonymise(user_id: str, key: str) -> str:
    """Keyed hash (HMAC-SHA256, 128 bits hex) of a user id: stable per key, not reversible without it."""
    if not key:
        raise ValueError("pseudonym key must be a non-empty string")
    return hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:32]


def shown_items(item_ids: Sequence[str], origin: str | Sequence[str]) -> tuple[ShownItem, ...]:
    """Positions 1..n for a served list; `origin` is one name for all items or one per item."""
    origins = [origin] * len(item_ids) if isinstance(origin, str) else list(origin)
    if len(origins) != len(item_ids):
        raise ValueError(f"need one origin per item, got {len(origins)} for {len(item_ids)} items")
    return tuple(ShownItem(i, pos, o) for pos, (i, o) in enumerate(zip(item_ids, origins), start=1))


class ExposureLog:
    """Append-only exposure store; thread-safe (one connection guarded by a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._conn = open_durable(self.path, _SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ExposureLogError(f"cannot open exposure log {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def append(self, exposure: Exposure) -> None:
        """Store one exposure; committed and fsynced when this returns."""
        self.append_many([exposure])

    def append_many(self, exposures: Sequence[Exposure]) -> None:
        """Store several exposures in one transaction (all or none)."""
        rows = [
            (
                e.request_id,
                e.user_key,
                e.experiment,
                e.variant,
                e.model_version,
                int(e.ts),
                json.dumps([list(it) for it in e.items], separators=(",", ":")),
            )
            for e in exposures
        ]
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT INTO exposures (request_id, user_key, experiment, variant, model_version, ts, items)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                self._conn.execute("ROLLBACK")
                raise ExposureLogError(
                    f"exposure log {self.path}: request_id already logged ({exc}); request ids must be unique"
                ) from exc
            except sqlite3.Error as exc:
                # A closed or broken connection raises again here; the write error is what matters.
                with contextlib.suppress(sqlite3.Error):
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                raise ExposureLogError(f"cannot write exposure log {self.path}: {exc}") from exc

    def read(self, experiment: str | None = None) -> list[Exposure]:
        """All exposures in append order, optionally for one experiment."""
        sql = "SELECT request_id, user_key, experiment, variant, model_version, ts, items FROM exposures"
        params: tuple[str, ...] = ()
        if experiment is not None:
            sql += " WHERE experiment = ?"
            params = (experiment,)
        with self._lock:
            try:
                rows = self._conn.execute(sql + " ORDER BY seq", params).fetchall()
            except sqlite3.Error as exc:
                raise ExposureLogError(f"cannot read exposure log {self.path}: {exc}") from exc
        return [
            Exposure(r[0], r[1], r[2], r[3], tuple(tuple(x) for x in json.loads(r[6])), r[4], int(r[5]))
            for r in rows
        ]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM exposures").fetchone()[0])

    def to_frame(self, experiment: str | None = None) -> pl.DataFrame:
        """Long frame, one row per shown item (see module docstring)."""
        return exposures_frame(self.read(experiment))

    def export_parquet(self, path: str | Path, experiment: str | None = None) -> int:
        """Write the long frame to parquet (atomic rename); returns the number of rows."""
        frame = self.to_frame(experiment)
        out = Path(path)
        tmp = out.with_name(out.name + ".tmp")
        frame.write_parquet(tmp)
        tmp.replace(out)
        return frame.height

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ExposureLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exposures_frame(exposures: Iterable[Exposure]) -> pl.DataFrame:
    """Exposures -> long frame with `EXPOSURE_SCHEMA`."""
    cols: dict[str, list] = {name: [] for name in EXPOSURE_SCHEMA}
    for e in exposures:
        items: Sequence[tuple[str | None, int | None, str | None]] = e.items or ((None, None, None),)
        for item_id, position, origin in items:
            cols["request_id"].append(e.request_id)
            cols["user_key"].append(e.user_key)
            cols["experiment"].append(e.experiment)
            cols["variant"].append(e.variant)
            cols["model_version"].append(e.model_version)
            cols["ts"].append(e.ts)
            cols["item_id"].append(item_id)
            cols["position"].append(position)
            cols["origin"].append(origin)
    return pl.DataFrame(cols, schema=EXPOSURE_SCHEMA)


ATTRIBUTED_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.Utf8(),
    "experiment": pl.Utf8(),
    "variant": pl.Utf8(),
    "item_id": pl.Utf8(),
    "position": pl.Int32(),
    "origin": pl.Utf8(),
    "event": pl.Utf8(),
    "value": pl.Float64(),
    "timestamp": pl.Int64(),
}


def attribute(exposures: pl.DataFrame, events: pl.DataFrame, window_s: int = 86_400) -> pl.DataFrame:
    """Attach each event to the exposure that caused it (at most one exposure per event).

    `events` needs `item_id, event, timestamp` and optionally `request_id`, `user_key`, `value`.
    An event whose `request_id` names a logged exposure is attributed to it if it is about an
    item that exposure showed (else it is not a response to the list and is dropped). Other
    events are attributed to the latest exposure of the same `user_key` that showed the item
    at most `window_s` seconds before the event. Returns `ATTRIBUTED_SCHEMA` rows.
    """
    missing = [c for c in ("item_id", "event", "timestamp") if c not in events.columns]
    if missing:
        raise ValueError(f"events need column(s) {', '.join(missing)}; got {', '.join(events.columns)}")
    ev = events.with_row_index("_event").with_columns(
        pl.col("item_id").cast(pl.Utf8),
        pl.col("event").cast(pl.Utf8),
        pl.col("timestamp").cast(pl.Int64),
        (pl.col("value") if "value" in events.columns else pl.lit(None)).cast(pl.Float64).alias("value"),
        (pl.col("request_id") if "request_id" in events.columns else pl.lit(None))
        .cast(pl.Utf8)
        .alias("request_id"),
        (pl.col("user_key") if "user_key" in events.columns else pl.lit(None))
        .cast(pl.Utf8)
        .alias("user_key"),
    )
    shown = exposures.filter(pl.col("item_id").is_not_null())
    out_cols = list(ATTRIBUTED_SCHEMA)

    known_requests = exposures.select("request_id").unique()
    by_request = ev.join(known_requests, on="request_id", how="semi")
    direct = by_request.drop("user_key").join(
        shown.select("request_id", "experiment", "variant", "item_id", "position", "origin"),
        on=["request_id", "item_id"],
        how="inner",
    )
    rest = ev.join(known_requests, on="request_id", how="anti").filter(pl.col("user_key").is_not_null())
    windowed = (
        rest.drop("request_id")
        .join(
            shown.select(
                "request_id", "user_key", "experiment", "variant", "item_id", "position", "origin", "ts"
            ),
            on=["user_key", "item_id"],
            how="inner",
        )
        .filter((pl.col("ts") <= pl.col("timestamp")) & (pl.col("timestamp") <= pl.col("ts") + window_s))
        .sort(["_event", "ts", "request_id"])
        .group_by("_event", maintain_order=True)
        .last()
    )
    frames = [
        f.select(out_cols).cast(ATTRIBUTED_SCHEMA)  # type: ignore[arg-type]
        for f in (direct.sort("_event"), windowed)
    ]
    return pl.concat(frames, how="vertical")
