from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from recsvc.events import EventStore, EventStoreError
from recsvc.history import Event


def _ev(user: str, item: str, ts: int, event: str = "click", value: float | None = None) -> Event:
    return Event(user_id=user, item_id=item, event=event, timestamp=ts, value=value, request_id=f"r-{ts}")


def test_appended_events_come_back_identical_in_time_order(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite")
    events = [_ev("u1", "i1", 30), _ev("u2", "i2", 10, "purchase", 2.5), _ev("u1", "i3", 20)]
    store.append(events)
    assert store.all() == [events[1], events[2], events[0]]


def test_acknowledged_events_survive_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ev.sqlite"
    store = EventStore(path)
    store.append([_ev("u1", "i1", 5)])
    # No close(): a crash right after the acknowledgement must not lose the event.
    reopened = EventStore(path)
    assert reopened.all() == [_ev("u1", "i1", 5)]


def test_database_uses_write_ahead_logging(tmp_path: Path) -> None:
    path = tmp_path / "ev.sqlite"
    EventStore(path).append([_ev("u", "i", 1)])
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_since_returns_only_events_at_or_after_the_timestamp(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite")
    store.append([_ev("u", "a", 1), _ev("u", "b", 2), _ev("u", "c", 3)])
    assert [e.item_id for e in store.since(2)] == ["b", "c"]


def test_since_after_seq_returns_only_later_appends(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite")
    first_seq = store.append([_ev("u", "a", 1), _ev("u", "b", 2)])
    store.append([_ev("u", "c", 1)])
    assert first_seq == 2
    assert [e.item_id for e in store.since(0, after_seq=first_seq)] == ["c"]
    assert store.last_seq() == 3


def test_batch_with_a_non_finite_value_writes_nothing(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite")
    with pytest.raises(EventStoreError, match="finite"):
        store.append([_ev("u", "a", 1), _ev("u", "b", 2, value=float("nan"))])
    assert store.count() == 0


def test_unopenable_path_raises_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EventStoreError, match="file"):
        EventStore(blocker / "ev.sqlite")


def test_empty_append_is_a_no_op(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite")
    assert store.append([]) == 0
    assert store.count() == 0


def test_append_after_close_raises_an_event_store_error(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "ev.sqlite")
    store.close()
    with pytest.raises(EventStoreError, match=r"ev\.sqlite"):
        store.append([_ev("u", "a", 1)])
