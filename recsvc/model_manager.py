"""Which bundle versions are loaded, and swapping them without dropping a request.

A new version is loaded, brought up to date with the live events and warmed *beside* the
serving one; only then is the manager's state (an immutable snapshot) replaced by a single
attribute assignment. A request holds a reference to the `LoadedModel` it started with, so
in-flight requests finish on the old version, which Python frees once the last one is done.
A bundle that fails to load (corrupt, incomplete) is refused and the old one keeps serving.

Events: `record_events` appends to the durable `EventStore` and applies to every held model
under one lock; a loader replays the store up to a sequence number, then catches up the rest
under that same lock just before the swap, so every event reaches every model exactly once.

Several server processes (ServeConfig.processes > 1) share one event store: each manager then
remembers the last sequence number it applied, and `sync_events` (called before every
Recommend batch, and by `record_events` instead of applying only its own events) applies every
stored event above it, in sequence order. A shared "last committed seq" (`CommitSignal`, bumped
after each commit) tells a process it is behind without a query, so in the common case the
check is one shared-memory read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from recsvc import bundle as bundle_store
from recsvc.bundle import BundleError, LoadedBundle
from recsvc.events import EventStore
from recsvc.history import Event
from recsvc.recommender import Recommender

log = logging.getLogger(__name__)


class NoModelError(RuntimeError):
    """No bundle has been loaded yet (the service answers UNAVAILABLE)."""


class UnknownVersionError(LookupError):
    """A request or experiment names a bundle version that is not loaded or published."""


@dataclass(frozen=True)
class LoadedModel:
    """A bundle with its warmed Recommender; immutable so it can be shared across threads."""

    version: str
    bundle: LoadedBundle
    recommender: Recommender
    event_types: frozenset[str]
    loaded_at: float

    def knows_item(self, item_id: str) -> bool:
        return item_id in self.bundle.catalog.index

    @property
    def attributes(self) -> frozenset[str]:
        return frozenset(self.bundle.catalog.attributes)


def load_model(path: str | Path) -> LoadedModel:
    """Verify and load a bundle, build its Recommender and warm it (slow; run off the event loop)."""
    bundle = bundle_store.load(path)
    recommender = Recommender(bundle)
    return LoadedModel(
        version=bundle.version,
        bundle=bundle,
        recommender=recommender,
        event_types=frozenset(bundle.config.data.event_weights),
        loaded_at=time.time(),
    )


@dataclass(frozen=True)
class _State:
    active: LoadedModel | None = None
    previous: LoadedModel | None = None
    pinned: Mapping[str, LoadedModel] = field(default_factory=dict)

    def models(self) -> list[LoadedModel]:
        """Every distinct model held (events must reach all of them)."""
        seen: dict[str, LoadedModel] = {}
        for m in (self.active, self.previous, *self.pinned.values()):
            if m is not None and m.version not in seen:
                seen[m.version] = m
        return list(seen.values())


class CommitSignal(Protocol):
    """The newest event seq committed by any process (`recsvc.server_processes.SharedSeq`)."""

    def read(self) -> int: ...

    def advance(self, seq: int) -> None: ...


Listener = Callable[[str, str], None]  # (outcome, version): outcome in loaded|refused|rollback


class ModelManager:
    """Holds the active bundle (plus the previous one and any A/B-pinned versions)."""

    def __init__(
        self,
        bundles_root: str | Path,
        events: EventStore | None = None,
        *,
        keep_previous: bool = True,
        loader: Callable[[Path], LoadedModel] = load_model,
        listener: Listener | None = None,
        commit_signal: CommitSignal | None = None,
    ) -> None:
        """`commit_signal`: set when other processes append to the same event store."""
        self.bundles_root = Path(bundles_root)
        self._events = events
        self._keep_previous = keep_previous
        self._loader = loader
        self._listener = listener
        self._state = _State()
        self._reload_lock = threading.Lock()  # one load at a time
        self._events_lock = threading.Lock()  # event append+apply vs. swap
        self._seen_current: str | None = None
        self._refused: dict[str, str] = {}  # version -> error, so polling doesn't retry it forever
        self._commits = commit_signal
        self._applied_seq = 0  # shared store: every event up to here reached every held model

    # ------------------------------------------------------------------ reading

    @property
    def active(self) -> LoadedModel:
        model = self._state.active
        if model is None:
            raise NoModelError("no model bundle is loaded yet")
        return model

    @property
    def ready(self) -> bool:
        return self._state.active is not None

    def get(self, version: str | None = None) -> LoadedModel:
        """The active model, or a specific loaded version (A/B variants pin versions)."""
        state = self._state
        if version is None:
            return self.active
        for model in state.models():
            if model.version == version:
                return model
        raise UnknownVersionError(
            f"bundle version {version!r} is not loaded (loaded: {', '.join(self.loaded_versions())})"
        )

    def loaded_versions(self) -> list[str]:
        return [m.version for m in self._state.models()]

    @property
    def previous_version(self) -> str | None:
        prev = self._state.previous
        return prev.version if prev is not None else None

    # ------------------------------------------------------------------ loading

    def reload(self, version: str | None = None) -> LoadedModel:
        """Load `version` (default: what CURRENT names), warm it, swap it in; BundleError if refused.

        Reloading the version already active is a no-op that returns it.
        """
        with self._reload_lock:
            target = version if version is not None else bundle_store.current_version(self.bundles_root)
            if version is None:
                self._seen_current = target
            current = self._state.active
            if current is not None and current.version == target:
                return current
            held = {m.version: m for m in self._state.models()}
            if target in held:
                # Already in memory (previous or pinned) and kept up to date with events.
                model, replayed_to = held[target], None
            else:
                model, replayed_to = self._load_beside(target)
            with self._events_lock:
                if replayed_to is not None:
                    self._catch_up(model, replayed_to)
                old = self._state
                pinned = {v: m for v, m in old.pinned.items() if v != model.version}
                previous = old.active if self._keep_previous else None
                self._state = _State(active=model, previous=previous, pinned=pinned)
            self._refused.pop(target, None)
            log.info(
                "serving bundle %s (previous: %s)", model.version, previous.version if previous else None
            )
            self._notify("loaded", model.version)
            return model

    def poll_current(self) -> LoadedModel | None:
        """Reload when BUNDLES/CURRENT names a new version; None when nothing changed or refused.

        A refused version is not retried until CURRENT changes again.
        """
        try:
            target = bundle_store.current_version(self.bundles_root)
        except BundleError as exc:
            if self._seen_current is not None:
                log.warning("cannot read CURRENT: %s; keeping %s", exc, self._seen_current)
            return None
        if target == self._seen_current or target in self._refused:
            return None
        try:
            return self.reload()
        except BundleError:
            return None

    def pin(self, version: str) -> LoadedModel:
        """Load and hold `version` beside the active one (a variant serves it)."""
        with self._reload_lock:
            for model in self._state.models():
                if model.version == version:
                    if version not in self._state.pinned:
                        with self._events_lock:
                            s = self._state
                            self._state = replace(s, pinned={**s.pinned, version: model})
                    return model
            model, replayed_to = self._load_beside(version)
            with self._events_lock:
                self._catch_up(model, replayed_to)
                s = self._state
                self._state = replace(s, pinned={**s.pinned, version: model})
            self._notify("pinned", version)
            return model

    def rollback(self) -> LoadedModel:
        """Swap back to the previously active version (kept in memory, up to date with events)."""
        with self._reload_lock, self._events_lock:
            s = self._state
            if s.previous is None or s.active is None:
                raise UnknownVersionError("no previous bundle version is loaded to roll back to")
            self._state = _State(active=s.previous, previous=s.active, pinned=s.pinned)
            model = s.previous
        log.info("rolled back to bundle %s (from %s)", model.version, s.active.version)
        self._notify("rollback", model.version)
        return model

    def publish_current(self) -> None:
        """Point BUNDLES/CURRENT at the active version (atomically), so that every process
        polling CURRENT swaps to it; this process will not reload it again."""
        with self._reload_lock:
            version = self.active.version
            bundle_store.set_current(self.bundles_root, version, verify_bundle=False)
            self._seen_current = version

    def _load_beside(self, version: str) -> tuple[LoadedModel, int]:
        """Load, replay stored events and warm; returns the model and the last replayed seq."""
        path = self.bundles_root / version
        if not (path / bundle_store.MANIFEST_NAME).is_file():
            known = ", ".join(bundle_store.list_versions(self.bundles_root)) or "none"
            raise UnknownVersionError(
                f"no published bundle {version!r} in {self.bundles_root} (versions: {known})"
            )
        started = time.perf_counter()
        try:
            model = self._loader(path)
            replayed_to = self._replay(model)
            model.recommender.warm()
        except BundleError as exc:
            self._refused[version] = str(exc)
            log.error("refused bundle %s: %s", version, exc)
            self._notify("refused", version)
            raise
        except Exception as exc:
            # Any failure to build a working model (bad arrays, ranker load) counts as corrupt.
            self._refused[version] = str(exc)
            log.exception("refused bundle %s: it failed to load or warm", version)
            self._notify("refused", version)
            raise BundleError(f"bundle {version} failed to load or warm: {exc}") from exc
        log.info("loaded and warmed bundle %s in %.1f s", version, time.perf_counter() - started)
        return model, replayed_to

    # ------------------------------------------------------------------ events

    @property
    def shared_events(self) -> bool:
        """True when other processes append to the same event store (see `sync_events`)."""
        return self._commits is not None and self._events is not None

    def record_events(self, events: Sequence[Event]) -> None:
        """Durably append, then apply to every held model; returns once both are done.

        With a shared store, "apply" means catching up on everything up to our own commit, so the
        events other processes acknowledged before ours reach the models first, in seq order.
        """
        with self._events_lock:
            if self._events is not None:
                seq = self._events.append(events)
                if self._commits is not None:
                    self._commits.advance(seq)
                    self._sync_locked()
                    return
            for model in self._state.models():
                _apply(model, events)

    def sync_events(self) -> None:
        """Apply the events other processes committed since our last sync (shared store only).

        Cheap when up to date: one read of the shared commit signal, no lock, no query.
        """
        commits = self._commits
        if commits is None or commits.read() <= self._applied_seq:
            return
        with self._events_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        """Bring every held model to the store's end (caller holds the events lock)."""
        assert self._events is not None
        models = self._state.models()
        if not models:
            # Nothing to feed: a model loaded later replays the store itself.
            self._applied_seq = max(self._applied_seq, self._events.last_seq())
            return
        pairs = self._events.after(self._applied_seq)
        if not pairs:
            return
        events = [e for _, e in pairs]
        for model in models:
            _apply(model, events)
        self._applied_seq = pairs[-1][0]

    def _replay(self, model: LoadedModel) -> int:
        """Apply the stored events newer than the bundle's data, up to the store's current end."""
        model_seq = 0
        if self._events is not None:
            model_seq = self._events.last_seq()
            events = self._events.since(model.bundle.data_end_ts, up_to_seq=model_seq)
            if events:
                applied = _apply(model, events)
                log.info("replayed %d/%d stored events into bundle %s", applied, len(events), model.version)
        return model_seq

    def _catch_up(self, model: LoadedModel, replayed_to: int) -> None:
        """Events that arrived while `model` loaded (caller holds the events lock)."""
        if self._events is None:
            return
        up_to: int | None = None
        if self._commits is not None:
            # Shared store: first bring the held models to the store's end, then the new model to
            # exactly that point, so the next sync applies each later event once to all of them.
            self._sync_locked()
            up_to = self._applied_seq
        events = self._events.since(model.bundle.data_end_ts, after_seq=replayed_to, up_to_seq=up_to)
        if events:
            _apply(model, events)

    def _notify(self, outcome: str, version: str) -> None:
        if self._listener is not None:
            try:
                self._listener(outcome, version)
            except Exception:
                log.exception("model listener failed for %s %s", outcome, version)


def _apply(model: LoadedModel, events: Sequence[Event]) -> int:
    """Feed the events this model can use (its catalogue, its event types); returns how many."""
    usable = [e for e in events if model.knows_item(e.item_id) and e.event in model.event_types]
    if usable:
        model.recommender.record_events(usable)
    return len(usable)
