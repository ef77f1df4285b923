from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss

from recsvc.compute_threads import limit_this_thread
from recsvc.config import ServeConfig
from recsvc.server import RecsvcServer


def _faiss_threads() -> int:
    return int(faiss.omp_get_max_threads())


def test_the_server_worker_threads_run_faiss_with_the_configured_cap(tmp_path: Path) -> None:
    config = ServeConfig(
        bundles=str(tmp_path / "bundles"),
        events_db=str(tmp_path / "events.sqlite"),
        exposures_db=str(tmp_path / "exposures.sqlite"),
        metrics_port=0,
        compute_threads=1,
    )
    server = RecsvcServer(config)
    try:
        seen = [server.executor.submit(_faiss_threads).result() for _ in range(config.workers)]
    finally:
        server.executor.shutdown()
    assert seen == [1] * config.workers


def test_pool_threads_started_with_limit_this_thread_run_faiss_with_the_cap() -> None:
    with ThreadPoolExecutor(2, initializer=limit_this_thread, initargs=(1,)) as pool:
        assert [f.result() for f in [pool.submit(_faiss_threads) for _ in range(4)]] == [1, 1, 1, 1]


def test_zero_leaves_the_thread_alone() -> None:
    with ThreadPoolExecutor(1, initializer=limit_this_thread, initargs=(0,)) as pool:
        assert pool.submit(_faiss_threads).result() == _faiss_threads()
