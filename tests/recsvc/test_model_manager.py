"""ModelManager with real bundles on disk and a real event store."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from recsvc.bundle import BundleError
from recsvc.events import EventStore
from recsvc.history import Event
from recsvc.model_manager import ModelManager, NoModelError, UnknownVersionError
from recsvc.recommender import RecommendRequest
from tests.helpers.running_server import FIRST_VERSION, add_version

SECOND = "20240102T000000Z"
THIRD = "20240103T000000Z"


@pytest.fixture()
def store(tmp_path: Path) -> EventStore:
    return EventStore(tmp_path / "events.sqlite")


def _history_len(manager: ModelManager, user: str, version: str | None = None) -> int:
    return len(manager.get(version).bundle.history.get(user))


def _purchase(manager: ModelManager, user: str, i: int = 0) -> Event:
    model = manager.active
    return Event(user, str(model.bundle.catalog.item_ids[i]), "purchase", model.bundle.data_end_ts + 10)


def test_nothing_is_active_before_the_first_load(root: Path) -> None:
    manager = ModelManager(root)
    assert manager.ready is False
    with pytest.raises(NoModelError):
        _ = manager.active


def test_reload_serves_what_current_names(root: Path, store: EventStore) -> None:
    manager = ModelManager(root, store)
    model = manager.reload()
    assert model.version == FIRST_VERSION
    assert manager.active is model
    assert manager.loaded_versions() == [FIRST_VERSION]


def test_reloading_the_active_version_keeps_the_same_model(root: Path) -> None:
    manager = ModelManager(root)
    first = manager.reload()
    assert manager.reload(FIRST_VERSION) is first


def test_swap_keeps_the_previous_model_usable_by_holders(root: Path, store: EventStore) -> None:
    manager = ModelManager(root, store)
    old = manager.reload()
    add_version(root, SECOND, make_current=True)
    new = manager.reload()
    assert manager.active is new and new.version == SECOND
    # A request that grabbed the old model before the swap still completes on it.
    result = old.recommender.recommend(RecommendRequest(user_id="holder", k=3))
    assert result.model_version == FIRST_VERSION
    assert manager.previous_version == FIRST_VERSION


def test_corrupt_bundle_is_refused_and_the_active_model_is_unchanged(root: Path) -> None:
    manager = ModelManager(root)
    old = manager.reload()
    add_version(root, SECOND, corrupt=True, make_current=True)
    with pytest.raises(BundleError, match=r"item_embeddings\.npy"):
        manager.reload()
    assert manager.active is old


def test_polling_does_not_retry_a_refused_version_until_current_changes(root: Path) -> None:
    outcomes: list[tuple[str, str]] = []
    manager = ModelManager(root, listener=lambda outcome, version: outcomes.append((outcome, version)))
    manager.reload()
    add_version(root, SECOND, corrupt=True, make_current=True)
    assert manager.poll_current() is None
    assert manager.poll_current() is None
    assert outcomes.count(("refused", SECOND)) == 1
    add_version(root, THIRD, make_current=True)
    model = manager.poll_current()
    assert model is not None and model.version == THIRD


def test_poll_without_a_change_does_nothing(root: Path) -> None:
    manager = ModelManager(root)
    first = manager.reload()
    assert manager.poll_current() is None
    assert manager.active is first


def test_unknown_version_is_reported_with_the_published_ones(root: Path) -> None:
    manager = ModelManager(root)
    manager.reload()
    with pytest.raises(UnknownVersionError, match=FIRST_VERSION):
        manager.reload("20990101T000000Z")
    with pytest.raises(UnknownVersionError, match="not loaded"):
        manager.get("20990101T000000Z")


def test_rollback_swaps_back_to_the_previous_model(root: Path) -> None:
    manager = ModelManager(root)
    first = manager.reload()
    add_version(root, SECOND)
    manager.reload(SECOND)
    assert manager.rollback() is first
    assert manager.previous_version == SECOND


def test_rollback_without_a_previous_version_raises(root: Path) -> None:
    manager = ModelManager(root)
    manager.reload()
    with pytest.raises(UnknownVersionError, match="no previous"):
        manager.rollback()


def test_events_are_stored_and_applied_to_every_held_model(root: Path, store: EventStore) -> None:
    manager = ModelManager(root, store)
    manager.reload()
    add_version(root, SECOND)
    manager.reload(SECOND)
    manager.record_events([_purchase(manager, "ev-user")])
    assert store.count() == 1
    assert _history_len(manager, "ev-user", SECOND) == 1
    assert _history_len(manager, "ev-user", FIRST_VERSION) == 1


def test_a_newly_loaded_bundle_replays_stored_events(root: Path, store: EventStore) -> None:
    manager = ModelManager(root, store)
    manager.reload()
    manager.record_events([_purchase(manager, "replay-user", 1), _purchase(manager, "replay-user", 2)])
    fresh = ModelManager(root, store)
    fresh.reload()
    assert _history_len(fresh, "replay-user") == 2


def test_events_older_than_the_bundle_data_are_not_replayed(root: Path, store: EventStore) -> None:
    manager = ModelManager(root, store)
    model = manager.reload()
    item = str(model.bundle.catalog.item_ids[0])
    store.append([Event("old-user", item, "click", model.bundle.data_end_ts - 100)])
    fresh = ModelManager(root, store)
    fresh.reload()
    assert _history_len(fresh, "old-user") == 0


def test_events_arriving_during_a_load_reach_the_new_model_exactly_once(
    root: Path, store: EventStore
) -> None:
    manager = ModelManager(root, store)
    manager.reload()
    add_version(root, SECOND)
    stop = threading.Event()
    sent = [0]

    def writer() -> None:
        while not stop.is_set():
            manager.record_events([_purchase(manager, "busy-user", sent[0] % 5)])
            sent[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        manager.reload(SECOND)
    finally:
        stop.set()
        thread.join()
    assert sent[0] > 0
    assert _history_len(manager, "busy-user", SECOND) == sent[0]
    assert _history_len(manager, "busy-user", FIRST_VERSION) == sent[0]


def test_pinned_version_is_held_beside_the_active_one(root: Path, store: EventStore) -> None:
    manager = ModelManager(root, store)
    manager.reload()
    add_version(root, SECOND)
    pinned = manager.pin(SECOND)
    assert manager.active.version == FIRST_VERSION
    assert manager.get(SECOND) is pinned
    assert sorted(manager.loaded_versions()) == [FIRST_VERSION, SECOND]


def test_without_keep_previous_only_the_active_model_is_held(root: Path) -> None:
    manager = ModelManager(root, keep_previous=False)
    manager.reload()
    add_version(root, SECOND)
    manager.reload(SECOND)
    assert manager.loaded_versions() == [SECOND]
