"""Run the real `RecsvcServer` on a loopback port in a background event-loop thread.

Tests then talk to it with the real blocking client over real gRPC, exactly like a caller would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from recsvc.client import RecsvcClient
from recsvc.config import ServeConfig
from recsvc.server import RecsvcServer

T = TypeVar("T")


def serve_config(bundles: Path, workdir: Path, **overrides: Any) -> ServeConfig:
    """Loopback, any free port, no metrics port, stores under `workdir`, fast polling."""
    base = ServeConfig(
        bundles=str(bundles),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        events_db=str(workdir / "events.sqlite"),
        exposures_db=str(workdir / "exposures.sqlite"),
        reload_poll_s=0.1,
        workers=2,
        shutdown_grace_s=1.0,
    )
    return replace(base, **overrides)


class RunningServer:
    """Context manager: starts on enter (waits until start() returns), stops on exit."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.server = RecsvcServer(config)
        self._stopped = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> RunningServer:
        self.call(self.server.start())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self, timeout: float = 10.0) -> RecsvcClient:
        return RecsvcClient(self.target, timeout=timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- bundles on disk

_SHARED: dict[str, Path] = {}
FIRST_VERSION = "20240101T000000Z"


def shared_bundle_root(tmp_path_factory: Any, interactions: Any, items: Any) -> Path:
    """One real published bundle per test session (building it is the slow part); read-only."""
    if "root" not in _SHARED:
        from tests.helpers.bundle_builder import write_bundle

        built = write_bundle(interactions, items, tmp_path_factory.mktemp("served") / "bundles")
        _SHARED["root"] = built
    return _SHARED["root"]


def copy_root(src_root: Path, dst_root: Path, version: str = FIRST_VERSION) -> Path:
    """A private bundles root holding the shared bundle as `version` (CURRENT -> it)."""
    import shutil

    from recsvc import bundle as bundle_store

    src = bundle_store.resolve(src_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst_root / version)
    (dst_root / "CURRENT").write_text(version + "\n", encoding="utf-8")
    return dst_root


def add_version(
    root: Path,
    version: str,
    *,
    source: str = FIRST_VERSION,
    corrupt: bool = False,
    make_current: bool = False,
) -> Path:
    """Publish a copy of bundle `source` as `version` (optionally with one corrupted file)."""
    import shutil

    dst = root / version
    shutil.copytree(root / source, dst)
    if corrupt:
        with open(dst / "item_embeddings.npy", "ab") as fh:
            fh.write(b"\x00corrupt")
    if make_current:
        tmp = root / "CURRENT.tmp"
        tmp.write_text(version + "\n", encoding="utf-8")
        tmp.replace(root / "CURRENT")
    return dst


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` expecting a grpc.RpcError; return it (AssertionError if the call succeeded)."""
    import grpc

    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded but an RPC error was expected")


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `predicate` every 50 ms; AssertionError when it is still false after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not reached in {timeout} s")
