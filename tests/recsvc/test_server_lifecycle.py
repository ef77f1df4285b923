"""Server life cycle: health transitions, restart durability, hot swap under load, refusal of
corrupt bundles, rollback, deadlines and overload. Each test runs its own real server."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import faiss
import grpc
import pytest
from grpc_health.v1 import health_pb2

from recsvc import bundle as bundle_store
from recsvc.client import RecsvcClient, event
from recsvc.config import ServeConfig
from recsvc.v1 import recommender_pb2 as pb
from tests.helpers.running_server import (
    FIRST_VERSION,
    RunningServer,
    add_version,
    copy_root,
    rpc_error,
    serve_config,
    wait_until,
)

SECOND_VERSION = "20240102T000000Z"


def _some_item(root: Path) -> str:
    return str(bundle_store.load(root, verify=False).catalog.item_ids[4])


def test_health_is_not_serving_until_a_bundle_appears_then_serving(tmp_path: Path, bundle_root: Path) -> None:
    empty = tmp_path / "bundles"
    empty.mkdir()
    with RunningServer(serve_config(empty, tmp_path)) as server, server.client() as c:
        assert c.health() == "NOT_SERVING"
        err = rpc_error(c.recommend, "u", 3)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        copy_root(bundle_root, empty)
        c.wait_until_serving(timeout=20)
        assert c.recommend("u", 3).model_version == FIRST_VERSION


def test_health_goes_not_serving_on_shutdown(root: Path, tmp_path: Path) -> None:
    server = RunningServer(serve_config(root, tmp_path)).start()
    with server.client() as c:
        assert c.health() == "SERVING"
    server.call(server.server.health.enter_graceful_shutdown())
    answer = server.call(server.server.health.Check(health_pb2.HealthCheckRequest(service=""), None))
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    server.stop()


def test_acknowledged_events_survive_a_restart(root: Path, tmp_path: Path) -> None:
    item = _some_item(root)
    config = serve_config(root, tmp_path)
    with RunningServer(config) as first, first.client() as c:
        assert c.recommend("restart-user", 5).personalised is False
        assert c.record_events([event("restart-user", item, "purchase")]) == 1
        expected = [it.item_id for it in c.recommend("restart-user", 5).items]
    with RunningServer(config) as second, second.client() as c:
        resp = c.recommend("restart-user", 5)
        assert resp.personalised is True
        assert [it.item_id for it in resp.items] == expected


def test_hot_swap_under_concurrent_load_fails_no_request(root: Path, tmp_path: Path) -> None:
    with RunningServer(serve_config(root, tmp_path, workers=2)) as server:
        failures: list[str] = []
        versions: set[str] = set()
        counts = [0] * 4
        stop = threading.Event()

        def hammer(n: int) -> None:
            with server.client(timeout=10) as c:
                while not stop.is_set():
                    try:
                        versions.add(c.recommend(f"user-{n}-{counts[n] % 7}", 5).model_version)
                        counts[n] += 1
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")

        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: FIRST_VERSION in versions and min(counts) > 0)
        add_version(root, SECOND_VERSION, make_current=True)
        wait_until(lambda: server.server.models.active.version == SECOND_VERSION)
        swapped_at = list(counts)
        wait_until(lambda: SECOND_VERSION in versions and all(c > s for c, s in zip(counts, swapped_at)))
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    assert versions == {FIRST_VERSION, SECOND_VERSION}
    assert min(counts) > 0


def test_corrupt_bundle_is_refused_and_the_old_one_keeps_serving(root: Path, tmp_path: Path) -> None:
    with RunningServer(serve_config(root, tmp_path)) as server, server.client() as c:
        add_version(root, SECOND_VERSION, corrupt=True, make_current=True)
        wait_until(
            lambda: server.server.metrics.registry.get_sample_value(
                "recsvc_reloads_total", {"outcome": "refused"}
            )
        )
        assert c.recommend("u", 3).model_version == FIRST_VERSION
        err = rpc_error(c.reload, SECOND_VERSION)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "item_embeddings.npy" in err.details() and FIRST_VERSION in err.details()
        assert c.model_info().version == FIRST_VERSION
        assert c.health() == "SERVING"


def test_reload_rpc_swaps_and_rollback_returns_to_the_previous_version(root: Path, tmp_path: Path) -> None:
    add_version(root, SECOND_VERSION)
    with RunningServer(serve_config(root, tmp_path, reload_poll_s=60)) as server, server.client() as c:
        swapped = c.reload(SECOND_VERSION)
        assert (swapped.active_version, swapped.previous_version) == (SECOND_VERSION, FIRST_VERSION)
        assert c.recommend("u", 3).model_version == SECOND_VERSION
        assert sorted(c.model_info().loaded_versions) == [FIRST_VERSION, SECOND_VERSION]
        back = c.reload(rollback=True)
        assert back.active_version == FIRST_VERSION
        assert c.recommend("u", 3).model_version == FIRST_VERSION
        assert server.server.models.active.version == FIRST_VERSION


def test_reload_of_an_unpublished_version_is_not_found(root: Path, tmp_path: Path) -> None:
    with RunningServer(serve_config(root, tmp_path)) as server, server.client() as c:
        err = rpc_error(c.reload, "20990101T000000Z")
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "20990101T000000Z" in err.details()
        assert server.server.models.active.version == FIRST_VERSION


def _recommender_totals(server: RunningServer) -> float:
    return (
        server.server.metrics.registry.get_sample_value("recsvc_stage_latency_ms_count", {"stage": "total"})
        or 0.0
    )


def test_request_whose_deadline_passes_while_queued_is_not_computed(root: Path, tmp_path: Path) -> None:
    with RunningServer(serve_config(root, tmp_path, workers=1)) as server, server.client() as c:
        release = threading.Event()
        server.server.executor.submit(release.wait, 10)  # the only worker is busy
        computed_before = _recommender_totals(server)
        err = rpc_error(c.recommend, "u", 3, timeout=0.3)
        release.set()
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.recommend("u", 3).items  # the server is fine afterwards
        assert _recommender_totals(server) == computed_before + 1  # only the second request computed


def test_request_arriving_after_its_deadline_is_answered_deadline_exceeded(
    root: Path, tmp_path: Path
) -> None:
    with RunningServer(serve_config(root, tmp_path)) as server, server.client() as c:
        computed_before = _recommender_totals(server)
        # Stall the event loop so the request is only handled after its deadline.
        server.loop.call_soon_threadsafe(time.sleep, 0.6)
        err = rpc_error(c.recommend, "u", 3, timeout=0.2)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)
        assert _recommender_totals(server) == computed_before


def test_requests_beyond_max_in_flight_get_resource_exhausted_at_once(root: Path, tmp_path: Path) -> None:
    with (
        RunningServer(serve_config(root, tmp_path, workers=1, max_in_flight=1)) as server,
        server.client() as c,
    ):
        release = threading.Event()
        server.server.executor.submit(release.wait, 10)
        admitted = c.stub.Recommend.future(pb.RecommendRequest(user_id="first", num_results=3), timeout=20)
        wait_until(lambda: server.server.servicer.in_flight == 1)
        started = time.monotonic()
        err = rpc_error(c.recommend, "second", 3)
        answered_in = time.monotonic() - started
        release.set()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 concurrent" in err.details()
        assert answered_in < 5.0  # queued behind the blocked worker it would take >= 10 s
        assert len(admitted.result().items) == 3


def test_internal_errors_are_generic_and_carry_the_request_id(root: Path, tmp_path: Path, caplog) -> None:
    with RunningServer(serve_config(root, tmp_path)) as server, server.client() as c:
        # A real failure inside the Recommender: its ranker is gone (as if the model were unloaded).
        server.server.models.active.bundle.ranker = None
        err = rpc_error(c.recommend, "u", 3, request_id="boom-1")
        assert err.code() == grpc.StatusCode.INTERNAL
        assert err.details() == "internal error (request_id=boom-1)"
        assert "boom-1" in caplog.text
        assert c.health() == "SERVING"


def test_client_wait_until_serving_times_out_against_an_empty_root(tmp_path: Path) -> None:
    empty = tmp_path / "bundles"
    empty.mkdir()
    with (
        RunningServer(serve_config(empty, tmp_path)) as server,
        RecsvcClient(server.target) as c,
        pytest.raises(TimeoutError, match="NOT_SERVING"),
    ):
        c.wait_until_serving(timeout=0.3)


def test_client_wait_until_serving_fails_at_once_when_the_server_is_no_longer_alive(tmp_path: Path) -> None:
    empty = tmp_path / "bundles"
    empty.mkdir()
    with RunningServer(serve_config(empty, tmp_path)) as server, RecsvcClient(server.target) as c:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exited before it was SERVING"):
            c.wait_until_serving(timeout=30.0, alive=lambda: False)
        assert time.monotonic() - started < 5.0  # not the whole timeout


def _piled_up_behind_a_busy_worker(
    config: ServeConfig, users: list[str]
) -> tuple[dict[str, list[str]], dict[str, list[str]], float]:
    """Each user's answer alone, then all users sent at once while the only worker is busy:
    (answers alone, answers together, recommend_many batches the concurrent round took)."""
    with RunningServer(config) as server, server.client() as c:
        alone = {u: [it.item_id for it in c.recommend(u, 5).items] for u in users}
        sizes = server.server.metrics.registry
        batches_before = sizes.get_sample_value("recsvc_batch_size_count") or 0.0
        release = threading.Event()
        server.server.executor.submit(release.wait, 10)  # requests pile up behind the busy worker
        futures = [
            c.stub.Recommend.future(pb.RecommendRequest(user_id=u, num_results=5), timeout=20) for u in users
        ]
        wait_until(lambda: server.server.servicer.in_flight == len(users))
        release.set()
        together = {u: [it.item_id for it in f.result().items] for u, f in zip(users, futures)}
        batches = (sizes.get_sample_value("recsvc_batch_size_count") or 0.0) - batches_before
    return alone, together, batches


def test_concurrent_requests_are_batched_without_changing_any_answer(root: Path, tmp_path: Path) -> None:
    users = [f"user{i:03d}" for i in range(6)] + ["batch-unknown"]
    config = serve_config(root, tmp_path, workers=1, max_batch=8)
    alone, together, batches = _piled_up_behind_a_busy_worker(config, users)
    assert together == alone
    assert batches < len(users)  # fewer recommend_many calls than requests


def test_one_dispatcher_answers_everything_queued_behind_a_busy_batch_in_one_batch(
    root: Path, tmp_path: Path
) -> None:
    users = [f"user{i:03d}" for i in range(6)]
    config = serve_config(root, tmp_path, workers=1, max_batch=8, batch_dispatchers=1)
    alone, together, batches = _piled_up_behind_a_busy_worker(config, users)
    assert together == alone
    # the dispatcher took the first request at once; the other five waited and went as one batch
    assert batches == 2


def test_a_lingering_batcher_answers_every_request_with_the_same_items(root: Path, tmp_path: Path) -> None:
    users = [f"user{i:03d}" for i in range(9)] + ["linger-unknown"]
    config = serve_config(root, tmp_path, workers=1, max_batch=4, batch_dispatchers=1, batch_linger_ms=20.0)
    alone, together, batches = _piled_up_behind_a_busy_worker(config, users)
    assert together == alone
    # 1 taken at once, two full batches of 4, then the last one after the dispatcher lingered
    assert batches <= 4


def test_bundle_loading_threads_run_faiss_with_the_configured_cap(root: Path, tmp_path: Path) -> None:
    with RunningServer(serve_config(root, tmp_path, compute_threads=1)) as server:
        seen = server.call(asyncio.to_thread(faiss.omp_get_max_threads))
    assert seen == 1
