"""`recsvc-serve --processes 2` as real processes: one port, both children answer, events are
seen by every process, metrics aggregate, reload/rollback reach all, SIGTERM stops everything,
a killed child comes back, and start-up failures exit non-zero."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from recsvc import bundle as bundle_store
from recsvc.client import RecsvcClient, event, recommend_request
from recsvc.server import free_port
from recsvc.servicer import SERVER_PID_METADATA
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.helpers.running_server import FIRST_VERSION, add_version, copy_root, wait_until

REPO = Path(__file__).resolve().parents[2]
SECOND_VERSION = "20240102T000000Z"


class Supervised:
    """The supervisor as a subprocess; its stderr is collected line by line."""

    def __init__(self, root: Path, workdir: Path, *, port: int = 0, **env: str) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        full_env = {
            **os.environ,
            "RECSVC_EVENTS_DB": str(workdir / "events.sqlite"),
            "RECSVC_EXPOSURES_DB": str(workdir / "exposures.sqlite"),
            "RECSVC_METRICS_PORT": "0",
            "RECSVC_RELOAD_POLL_S": "0.1",
            "RECSVC_WORKERS": "1",
            "RECSVC_SHUTDOWN_GRACE_S": "1",
            **env,
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "recsvc.server",
                "--bundles",
                str(root),
                "--port",
                str(port),
                "--processes",
                "2",
            ],
            cwd=REPO,
            env=full_env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # EOF marker
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 90.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    match = re.search(pattern, self.lines[i])
                    if match:
                        return match
                    if self.lines[i] == "":
                        raise AssertionError(f"exited before {pattern!r}:\n{''.join(self.lines)}")
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)}")
                self._cond.wait(left)

    def wait_for_count(self, pattern: str, n: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for line in self.lines if re.search(pattern, line)) < n:
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == ""):
                    raise AssertionError(f"fewer than {n} lines matching {pattern!r}:\n{''.join(self.lines)}")
                self._cond.wait(left)

    def server_pids(self) -> set[int]:
        """The current server process of each index, from the supervisor's log."""
        latest: dict[str, int] = {}
        with self._cond:
            for line in self.lines:
                match = re.search(r"server process (\d+) started \(pid (\d+)\)", line)
                if match:
                    latest[match.group(1)] = int(match.group(2))
        return set(latest.values())

    def serving_port(self) -> int:
        return int(self.wait_for(r"serving on port (\d+) with 2 processes").group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(x) for x in out.stdout.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _all_exit(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _pid_of(channel: grpc.Channel) -> int:
    _, call = pb_grpc.RecommenderStub(channel).GetModelInfo.with_call(pb.GetModelInfoRequest(), timeout=10)
    return int(dict(call.trailing_metadata())[SERVER_PID_METADATA])


def _channel_per_process(port: int, want: int = 2, tries: int = 64) -> dict[int, grpc.Channel]:
    """Open connections until `want` distinct processes answered (the kernel spreads them)."""
    found: dict[int, grpc.Channel] = {}
    for _ in range(tries):
        # A local subchannel pool gives every channel its own TCP connection.
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        pid = _pid_of(channel)
        if pid in found:
            channel.close()
        else:
            found[pid] = channel
            if len(found) == want:
                return found
    raise AssertionError(f"only processes {sorted(found)} answered over {tries} connections")


def _stubs(channels: dict[int, grpc.Channel]) -> dict[int, pb_grpc.RecommenderStub]:
    return {pid: pb_grpc.RecommenderStub(ch) for pid, ch in channels.items()}


def _recommend(stub: pb_grpc.RecommenderStub, user: str, k: int = 5) -> pb.RecommendResponse:
    return stub.Recommend(recommend_request(user, k), timeout=10)


def _some_item(root: Path) -> str:
    return str(bundle_store.load(root, verify=False).catalog.item_ids[4])


@pytest.fixture(scope="module")
def pair(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One supervisor with two processes (metrics on) shared by the tests that do not stop it."""
    work = tmp_path_factory.mktemp("pair")
    root = copy_root(bundle_root, work / "bundles")
    add_version(root, SECOND_VERSION)
    metrics_port = free_port()
    sup = Supervised(root, work, RECSVC_METRICS_PORT=str(metrics_port))
    channels: dict[int, grpc.Channel] = {}
    try:
        channels = _channel_per_process(sup.serving_port())
        yield sup, root, channels, metrics_port
    finally:
        for channel in channels.values():
            channel.close()
        sup.stop()


# ----------------------------------------------------------------------------- one shared pair


def test_two_processes_answer_on_one_port(pair) -> None:
    sup, _root, channels, _ = pair
    assert set(channels) == sup.server_pids()  # both answering pids are the supervisor's children
    assert set(channels) <= _children(sup.proc.pid)
    for stub in _stubs(channels).values():
        assert _recommend(stub, "anyone").model_version == FIRST_VERSION


def test_clients_with_their_own_connection_spread_over_the_processes_and_default_ones_share_one(
    pair,
) -> None:
    """grpc shares one connection between channels to the same target; `own_connection` is how
    a caller spreads its load (the kernel spreads connections; 32 landing on one of two processes
    has probability 2^-31)."""
    sup, _, channels, _ = pair
    target = f"127.0.0.1:{sup.serving_port()}"
    shared = [RecsvcClient(target, timeout=10.0) for _ in range(8)]
    own = [RecsvcClient(target, timeout=10.0, own_connection=True) for _ in range(32)]
    try:
        assert len({_pid_of(client._channel) for client in shared}) == 1
        assert {_pid_of(client._channel) for client in own} == set(channels)
        assert len(own[0].recommend("spread-user", 5).items) == 5
    finally:
        for client in shared + own:
            client.close()


def test_an_event_recorded_on_one_process_changes_the_next_recommend_on_every_process(pair) -> None:
    _sup, root, channels, _ = pair
    stubs = _stubs(channels)
    item = _some_item(root)
    for writer_pid, writer in stubs.items():
        user = f"cross-process-{writer_pid}"
        assert all(not _recommend(s, user).personalised for s in stubs.values())
        accepted = writer.RecordEvents(
            pb.RecordEventsRequest(events=[event(user, item, "purchase")]), timeout=10
        )
        assert accepted.accepted == 1
        answers = {pid: _recommend(s, user) for pid, s in stubs.items()}
        assert all(a.personalised for a in answers.values()), {p: a.personalised for p, a in answers.items()}
        lists = {tuple(it.item_id for it in a.items) for a in answers.values()}
        assert len(lists) == 1  # every process applied the same events: the same answer


def test_metrics_endpoint_sums_every_process(pair) -> None:
    _sup, _root, channels, metrics_port = pair
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def recommends() -> float:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        match = re.search(r'recsvc_requests_total\{code="OK",method="Recommend"\} ([0-9.e+]+)', body)
        return float(match.group(1)) if match else 0.0

    before = recommends()
    for stub in _stubs(channels).values():
        for _ in range(3):
            _recommend(stub, "metrics-user")
    assert recommends() - before == 6.0
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    pids = set(re.findall(r'recsvc_bundle_info\{pid="(\d+)",version="' + FIRST_VERSION + r'"\} 1.0', body))
    assert pids == {str(p) for p in channels}


def _versions(stubs: dict[int, pb_grpc.RecommenderStub]) -> set[str]:
    return {s.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version for s in stubs.values()}


def test_reload_and_rollback_through_one_process_reach_every_process(pair) -> None:
    _sup, root, channels, _ = pair
    stubs = _stubs(channels)
    admin = next(iter(stubs.values()))
    swapped = admin.ReloadModel(pb.ReloadModelRequest(version=SECOND_VERSION), timeout=120)
    assert swapped.active_version == SECOND_VERSION  # answered once its own process swapped
    assert bundle_store.current_version(root) == SECOND_VERSION
    wait_until(lambda: _versions(stubs) == {SECOND_VERSION}, timeout=30.0)
    back = admin.ReloadModel(pb.ReloadModelRequest(rollback=True), timeout=120)
    assert back.active_version == FIRST_VERSION
    assert bundle_store.current_version(root) == FIRST_VERSION
    wait_until(lambda: _versions(stubs) == {FIRST_VERSION}, timeout=30.0)
    assert all(_recommend(s, "after-rollback").model_version == FIRST_VERSION for s in stubs.values())


def test_a_corrupt_bundle_named_by_the_reload_rpc_is_refused_and_current_is_unchanged(pair) -> None:
    _sup, root, channels, _ = pair
    add_version(root, "20240105T000000Z", corrupt=True)
    admin = next(iter(_stubs(channels).values()))
    with pytest.raises(grpc.RpcError) as err:
        admin.ReloadModel(pb.ReloadModelRequest(version="20240105T000000Z"), timeout=120)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert bundle_store.current_version(root) == FIRST_VERSION
    assert _versions(_stubs(channels)) == {FIRST_VERSION}


# ----------------------------------------------------------------------------- own supervisors


@pytest.mark.slow
def test_sigterm_stops_every_child_and_acknowledged_events_survive_a_restart(
    bundle_root: Path, tmp_path: Path
) -> None:
    root = copy_root(bundle_root, tmp_path / "bundles")
    item = _some_item(root)
    first = Supervised(root, tmp_path)
    try:
        port = first.serving_port()
        channels = _channel_per_process(port)
        children = _children(first.proc.pid)  # the servers and multiprocessing's helper
        assert first.server_pids() <= children and len(first.server_pids()) == 2
        writer = next(iter(_stubs(channels).values()))
        writer.RecordEvents(
            pb.RecordEventsRequest(events=[event("durable-mp", item, "purchase")]), timeout=10
        )
        expected = [it.item_id for it in _recommend(writer, "durable-mp").items]
        for ch in channels.values():
            ch.close()
    finally:
        code = first.stop()
    assert code == 0
    first.wait_for(r"supervisor stopped")
    # multiprocessing's resource tracker exits on its own once it reads EOF from the dead parent
    assert _all_exit(children, timeout=15.0), [pid for pid in children if _alive(pid)]
    second = Supervised(root, tmp_path)
    try:
        channels = _channel_per_process(second.serving_port())
        for stub in _stubs(channels).values():
            answer = _recommend(stub, "durable-mp")
            assert answer.personalised and [it.item_id for it in answer.items] == expected
        for ch in channels.values():
            ch.close()
    finally:
        assert second.stop() == 0


@pytest.mark.slow
def test_a_killed_child_is_restarted_and_serves_again(bundle_root: Path, tmp_path: Path) -> None:
    root = copy_root(bundle_root, tmp_path / "bundles")
    sup = Supervised(root, tmp_path)
    try:
        port = sup.serving_port()
        victim = min(sup.server_pids())
        os.kill(victim, signal.SIGKILL)
        sup.wait_for(rf"pid {victim}\) exited unexpectedly with code -9.*restarting")
        sup.wait_for_count(r"server process \d \(pid \d+\) is SERVING", 3)
        servers = sup.server_pids()
        assert victim not in servers and len(servers) == 2 and servers <= _children(sup.proc.pid)
        channels = _channel_per_process(port)
        assert set(channels) == servers
        for ch in channels.values():
            ch.close()
    finally:
        assert sup.stop() == 0


def test_a_port_in_use_exits_non_zero_with_a_clear_message(bundle_root: Path, tmp_path: Path) -> None:
    root = copy_root(bundle_root, tmp_path / "bundles")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = Supervised(root, tmp_path, port=port)
        assert sup.proc.wait(timeout=60) == 2
    sup.wait_for(rf"recsvc-serve: error: cannot bind 127.0.0.1:{port}")
    assert "Traceback" not in "".join(sup.lines)


@pytest.mark.slow
def test_a_child_that_cannot_start_stops_the_supervisor_with_its_reason(
    bundle_root: Path, tmp_path: Path
) -> None:
    root = copy_root(bundle_root, tmp_path / "bundles")
    sup = Supervised(root, tmp_path, RECSVC_EXPERIMENTS=str(tmp_path / "missing-experiments.yaml"))
    assert sup.proc.wait(timeout=120) == 2
    sup.wait_for(r"recsvc-serve: error: server process \d could not start: .*missing-experiments.yaml")
