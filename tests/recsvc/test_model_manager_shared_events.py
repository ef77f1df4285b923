"""Two ModelManagers sharing one event store file and one commit signal, as two server
processes do (ServeConfig.processes > 1): every acknowledged event reaches both, once, in order."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from recsvc.events import EventStore
from recsvc.history import Event
from recsvc.model_manager import ModelManager
from recsvc.server_processes import SharedSeq
from tests.helpers.running_server import add_version

SECOND = "20240102T000000Z"


def _pair(root: Path, db: Path) -> tuple[ModelManager, ModelManager, SharedSeq]:
    """Two managers, each with its own connection to `db` (like two processes)."""
    commits = SharedSeq.create(multiprocessing.get_context("spawn"))
    a = ModelManager(root, EventStore(db), commit_signal=commits)
    b = ModelManager(root, EventStore(db), commit_signal=commits)
    a.reload()
    b.reload()
    return a, b, commits


def _purchase(manager: ModelManager, user: str, i: int) -> Event:
    model = manager.active
    return Event(user, str(model.bundle.catalog.item_ids[i]), "purchase", model.bundle.data_end_ts + 10 + i)


def _history(manager: ModelManager, user: str, version: str | None = None) -> list[str]:
    h = manager.get(version).bundle.history.get(user)
    return [f"{i}@{t}" for i, t in zip(h.items.tolist(), h.timestamps.tolist())]


def test_shared_seq_never_goes_back() -> None:
    seq = SharedSeq.create(multiprocessing.get_context("spawn"))
    seq.advance(7)
    seq.advance(3)
    assert seq.read() == 7


def test_an_event_recorded_by_one_manager_reaches_the_other_on_its_next_sync(
    root: Path, tmp_path: Path
) -> None:
    a, b, commits = _pair(root, tmp_path / "events.sqlite")
    a.record_events([_purchase(a, "shared-user", 3)])
    assert len(_history(a, "shared-user")) == 1
    assert _history(b, "shared-user") == []
    b.sync_events()
    assert _history(b, "shared-user") == _history(a, "shared-user")
    assert commits.read() == 1


def test_events_from_both_managers_apply_once_each_in_commit_order(root: Path, tmp_path: Path) -> None:
    a, b, _ = _pair(root, tmp_path / "events.sqlite")
    a.record_events([_purchase(a, "u", 1)])
    b.record_events([_purchase(b, "u", 2)])  # catches up on a's event first
    a.record_events([_purchase(a, "u", 3)])
    b.sync_events()
    a.sync_events()
    b.sync_events()  # nothing new: must not apply anything twice
    assert _history(a, "u") == _history(b, "u")
    assert len(_history(a, "u")) == 3


def test_sync_without_new_commits_reads_nothing(root: Path, tmp_path: Path) -> None:
    _a, b, _ = _pair(root, tmp_path / "events.sqlite")
    b._events.close()  # a query would now raise: an up-to-date sync must not query
    b.sync_events()


def test_a_bundle_loaded_later_holds_every_shared_event_exactly_once(root: Path, tmp_path: Path) -> None:
    a, b, _ = _pair(root, tmp_path / "events.sqlite")
    a.record_events([_purchase(a, "late", 1)])
    add_version(root, SECOND)
    b.reload(SECOND)  # b never synced: the load replays the store, old model catches up too
    b.sync_events()
    a.record_events([_purchase(a, "late", 2)])
    b.sync_events()
    assert _history(b, "late", SECOND) == _history(a, "late")
    assert _history(b, "late", b.previous_version) == _history(a, "late")


def test_a_single_process_manager_never_syncs(root: Path, tmp_path: Path) -> None:
    manager = ModelManager(root, EventStore(tmp_path / "events.sqlite"))
    manager.reload()
    assert manager.shared_events is False
    manager.record_events([_purchase(manager, "solo", 1)])
    manager._events.close()
    manager.sync_events()  # no signal: returns without touching the closed store
    assert len(_history(manager, "solo")) == 1
