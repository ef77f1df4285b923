"""The event store and the exposure log with several writer processes (ServeConfig.processes > 1):
concurrent appends from separate processes all commit (WAL + busy timeout), none is lost."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from recsvc.events import EventStore
from recsvc.exposures import Exposure, ExposureLog
from recsvc.history import Event

WRITES = 30


def _write_both(worker: int, events_db: str, exposures_db: str, start: object) -> None:
    """One writer process: WRITES event batches and WRITES exposures, as fast as it can."""
    store, log = EventStore(events_db), ExposureLog(exposures_db)
    start.wait()  # type: ignore[attr-defined]
    for i in range(WRITES):
        store.append(
            [Event(f"u{worker}", f"i{i}", "click", 1_700_000_000 + i), Event(f"u{worker}", "x", "view", 1)]
        )
        log.append(
            Exposure(f"w{worker}-r{i}", f"k{worker}", "exp", "A", (("i1", 1, "A"),), "v1", 1_700_000_000)
        )
    store.close()
    log.close()


def test_concurrent_writer_processes_lose_no_event_and_no_exposure(tmp_path: Path) -> None:
    events_db, exposures_db = str(tmp_path / "events.sqlite"), str(tmp_path / "exposures.sqlite")
    EventStore(events_db).close()
    ExposureLog(exposures_db).close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    writers = [ctx.Process(target=_write_both, args=(w, events_db, exposures_db, start)) for w in range(3)]
    for p in writers:
        p.start()
    start.set()
    for p in writers:
        p.join(120)
    assert [p.exitcode for p in writers] == [0, 0, 0]
    with EventStore(events_db) as store:
        pairs = store.after(0)
        assert len(pairs) == 3 * WRITES * 2
        seqs = [seq for seq, _ in pairs]
        assert seqs == sorted(set(seqs))
        for w in range(3):  # each writer's events keep their order in the shared log
            mine = [e.item_id for _, e in pairs if e.user_id == f"u{w}" and e.event == "click"]
            assert mine == [f"i{i}" for i in range(WRITES)]
    log = ExposureLog(exposures_db)
    try:
        assert log.count() == 3 * WRITES
    finally:
        log.close()


def test_both_logs_wait_for_a_busy_writer_instead_of_failing(tmp_path: Path) -> None:
    store, log = EventStore(tmp_path / "e.sqlite"), ExposureLog(tmp_path / "x.sqlite")
    try:
        for conn in (store._conn, log._conn):
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    finally:
        store.close()
        log.close()
