"""Several `RecsvcServer` processes on one port, under a supervisor (ServeConfig.processes > 1).

Why: a Recommend costs ~1.4 ms of Python CPU and one process holds the GIL for nearly all of
it, so one process uses about one core. gRPC's advice for CPU-bound Python servers is several
processes sharing the port with SO_REUSEPORT (the kernel spreads connections across them).

- Children are started with the `spawn` method: nothing of the supervisor's gRPC state is
  inherited (gRPC does not survive fork). The supervisor itself never starts gRPC.
- The supervisor binds the port first without SO_REUSEPORT (so "port in use" is reported
  clearly), then holds it with SO_REUSEPORT (never listening) so port 0 resolves to one port.
- Events: every process appends to the same SQLite event log; `SharedSeq` holds the newest
  committed sequence number in shared memory so a process queries the log only when another one
  has committed something it has not applied (see `ModelManager.sync_events`).
- Metrics: with `metrics_port` set, children write prometheus_client's multiprocess files into a
  private directory and the supervisor serves their aggregate on `metrics_port`.
- Signals: SIGTERM/SIGINT stop every child gracefully (children ignore SIGINT; the supervisor
  forwards it as SIGTERM). A child that dies unexpectedly is restarted (with back-off); a child
  that fails before the service ever served (bad port, unreadable event log) stops everything
  and the supervisor exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from recsvc.compute_threads import usable_cores
from recsvc.config import ServeConfig

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_STABLE_AFTER_S = 30.0  # a child that lived this long resets its back-off


class SupervisorError(RuntimeError):
    """The server processes cannot be started (the message says why)."""


def resolve_processes(processes: int) -> int:
    """ServeConfig.processes: 0 means one per usable core (the same count `recsvc-batch
    --workers` defaults to: affinity mask capped by a cgroup CPU quota)."""
    return processes if processes > 0 else usable_cores()


class SharedSeq:
    """Newest committed event seq, shared by every server process (`model_manager.CommitSignal`).

    A raw 8-byte shared integer: an aligned int64 read is atomic, so `read` takes no lock (it
    runs before every Recommend batch); `advance` takes the lock so the value never goes back.
    """

    def __init__(self, value: Any, lock: Any) -> None:
        self._value = value
        self._lock = lock

    @classmethod
    def create(cls, ctx: Any) -> SharedSeq:
        return cls(ctx.RawValue("q", 0), ctx.Lock())

    def read(self) -> int:
        return int(self._value.value)

    def advance(self, seq: int) -> None:
        with self._lock:
            if seq > self._value.value:
                self._value.value = seq


# ----------------------------------------------------------------------------- port


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Check `host:port` is free, then hold it with SO_REUSEPORT (never listening).

    Returns the holding socket and the port (a free one when `port` is 0). The hold keeps
    another program from taking the port while children start; the children bind it too.
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SupervisorError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from exc
        port = int(probe.getsockname()[1])
    hold = socket.socket(family, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        hold.bind((host, port))
    except OSError as exc:
        hold.close()
        raise SupervisorError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from exc
    return hold, port


# ----------------------------------------------------------------------------- child


def child_main(config: ServeConfig, index: int, commits: SharedSeq, reports: Any, log_level: str) -> None:
    """Entry point of one server process (runs in a fresh interpreter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards Ctrl-C as SIGTERM
    logging.basicConfig(
        level=log_level.upper(),
        format=f"ts=%(asctime)s level=%(levelname)s logger=%(name)s proc={index} pid=%(process)d %(message)s",
        stream=sys.stderr,
    )
    from recsvc.server import run_event_loop

    try:
        run_event_loop(_child_serve(config, index, commits, reports), config.event_loop)
    except Exception as exc:
        log.error("server process %d failed: %s", index, exc)
        reports.put(("failed", index, os.getpid(), str(exc)))
        sys.exit(2)


async def _child_serve(config: ServeConfig, index: int, commits: SharedSeq, reports: Any) -> None:
    from recsvc.server import RecsvcServer

    server = RecsvcServer(config, commit_signal=commits)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise

    async def announce() -> None:
        await server.serving.wait()
        reports.put(("serving", index, os.getpid(), ""))

    announcer = asyncio.create_task(announce())
    await stop.wait()
    announcer.cancel()
    log.info("server process %d stopping", index)
    await server.stop()


# ----------------------------------------------------------------------------- supervisor


@dataclass
class _Child:
    index: int
    process: Any
    started: float
    serving: bool = False
    failures: int = 0  # consecutive early deaths (back-off index)
    failure: str = ""  # what the child reported when it could not start


class Supervisor:
    """Starts, watches, restarts and stops the server processes."""

    def __init__(self, config: ServeConfig, log_level: str = "INFO") -> None:
        self.config = config
        self.log_level = log_level
        self.n = resolve_processes(config.processes)
        self._ctx = multiprocessing.get_context("spawn")
        self._reports = self._ctx.Queue()
        self._commits = SharedSeq.create(self._ctx)
        self._children: dict[int, _Child] = {}
        self._stop = threading.Event()
        self._metrics_dir: str | None = None
        self._metrics_server: Any = None
        self._hold: socket.socket | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.all_serving = threading.Event()
        self.failure: str | None = None  # why run() returned non-zero

    def request_stop(self, *_args: object) -> None:
        self._stop.set()

    def run(self) -> int:
        """Until a stop request; 0 after a clean stop, 2 when the children could not start."""
        try:
            self._prepare()
            for i in range(self.n):
                self._spawn(i)
            log.info(
                "started %d server processes on port %d; waiting until all report SERVING", self.n, self.port
            )
            return self._watch()
        finally:
            self._shutdown()

    def _prepare(self) -> None:
        from recsvc.events import EventStore

        # Create the shared stores once, before several processes race to create their schema,
        # and so that an unusable path is reported before any child starts.
        EventStore(self.config.events_db).close()
        if self.config.experiments:
            from recsvc.exposures import ExposureLog

            ExposureLog(self.config.exposures_db).close()
        self._hold, self.port = reserve_port(self.config.host, self.config.port)
        if self.config.metrics_port:
            self._start_metrics()

    def _start_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        self._metrics_dir = tempfile.mkdtemp(prefix="recsvc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir  # children inherit it at spawn
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)
        try:
            server, _thread = start_http_server(
                self.config.metrics_port, addr=self.config.host, registry=registry
            )
        except OSError as exc:
            raise SupervisorError(
                f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: {exc.strerror or exc}"
            ) from exc
        self._metrics_server = server
        self.metrics_port = int(server.server_port)
        log.info(
            "metrics endpoint (all server processes) on http://%s:%d/metrics",
            self.config.host,
            self.metrics_port,
        )

    def _child_config(self) -> ServeConfig:
        assert self.port is not None
        return replace(self.config, port=self.port, metrics_port=0, processes=self.n)

    def _spawn(self, index: int, failures: int = 0) -> None:
        process = self._ctx.Process(
            target=child_main,
            args=(self._child_config(), index, self._commits, self._reports, self.log_level),
            name=f"recsvc-server-{index}",
        )
        process.start()
        self._children[index] = _Child(index, process, time.monotonic(), failures=failures)
        log.info("server process %d started (pid %d)", index, process.pid)

    def _watch(self) -> int:
        pending_restarts: dict[int, tuple[float, int]] = {}  # index -> (when, failures)
        while not self._stop.is_set():
            self._drain_reports()
            failed = self._check_children(pending_restarts)
            if failed is not None:
                return failed
            now = time.monotonic()
            for index, (when, failures) in list(pending_restarts.items()):
                if now >= when:
                    del pending_restarts[index]
                    self._spawn(index, failures)
            self._stop.wait(0.1)
        log.info("shutdown signal received; stopping %d server processes", self.n)
        return 0

    def _drain_reports(self) -> None:
        while True:
            try:
                kind, index, pid, message = self._reports.get_nowait()
            except queue.Empty:
                return
            child = self._children.get(index)
            if child is None or child.process.pid != pid:
                continue
            if kind == "serving":
                child.serving = True
                log.info("server process %d (pid %d) is SERVING", index, pid)
                if not self.all_serving.is_set() and all(c.serving for c in self._children.values()):
                    self.all_serving.set()
                    log.info("serving on port %d with %d processes", self.port, self.n)
            elif kind == "failed":
                log.error("server process %d (pid %d) could not start: %s", index, pid, message)
                child.failure = message

    def _check_children(self, pending: dict[int, tuple[float, int]]) -> int | None:
        """Handle children that exited; an exit code for the supervisor when it must give up."""
        for index, child in list(self._children.items()):
            if child.process.is_alive() or index in pending:
                continue
            code = child.process.exitcode
            child.process.join()
            self._mark_dead(child.process.pid)
            if not self.all_serving.is_set() and not child.serving:
                self._drain_reports()
                reason = child.failure or f"exit code {code}"
                log.error("server process %d exited before serving (%s); stopping", index, reason)
                self.failure = f"server process {index} could not start: {reason}"
                return 2
            lived = time.monotonic() - child.started
            failures = 0 if lived >= _STABLE_AFTER_S else child.failures + 1
            delay = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S) - 1)]
            log.warning(
                "server process %d (pid %d) exited unexpectedly with code %s after %.1f s; restarting in %.1f s",
                index,
                child.process.pid,
                code,
                lived,
                delay,
            )
            pending[index] = (time.monotonic() + delay, failures)
        return None

    def _mark_dead(self, pid: int | None) -> None:
        if self._metrics_dir is not None and pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self._metrics_dir)

    def _shutdown(self) -> None:
        children = [c for c in self._children.values() if c.process.is_alive()]
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s + 15.0
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error(
                    "server process %d (pid %d) did not stop in time; killing it",
                    child.index,
                    child.process.pid,
                )
                child.process.kill()
                child.process.join(5)
        self._reports.close()
        self._reports.join_thread()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self._hold is not None:
            self._hold.close()
        if self._children:
            log.info("supervisor stopped (%d server processes)", self.n)


def supervise(config: ServeConfig, log_level: str = "INFO") -> int:
    """`recsvc-serve --processes N`: run the supervisor until SIGTERM/SIGINT; the exit status."""
    supervisor = Supervisor(config, log_level)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervisor.request_stop)
    code = supervisor.run()
    if code != 0 and supervisor.failure:
        raise SupervisorError(supervisor.failure)
    return code
