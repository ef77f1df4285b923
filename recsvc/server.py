"""`recsvc-serve`: assemble and run the grpc.aio recommendation server.

Start-up order matters for orchestration: the port is bound and health answers NOT_SERVING
first, then the bundle is loaded, events replayed and the model warmed, and only then does
health flip to SERVING. On SIGTERM/SIGINT health goes NOT_SERVING, new RPCs are refused and
in-flight ones get `shutdown_grace_s` to finish.

Configuration precedence: defaults < `--config FILE` (JSON or YAML) < `RECSVC_<FIELD>`
environment variables < command-line flags.

With `processes` > 1 (or 0 = one per usable core) `main` hands over to the supervisor in
`recsvc.server_processes`, which runs that many `RecsvcServer` processes on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from recsvc.compute_threads import limit_compute_threads, limit_this_thread
from recsvc.config import ServeConfig, from_dict
from recsvc.config_files import ConfigFileError, read_mapping
from recsvc.events import EventStore, EventStoreError
from recsvc.experiments import ExperimentConfigError, ExperimentRouter
from recsvc.exposures import ExposureLog, ExposureLogError
from recsvc.model_manager import CommitSignal, LoadedModel, ModelManager, load_model
from recsvc.servicer import RecommenderServicer
from recsvc.serving_metrics import ServingMetrics
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
ENV_PREFIX = "RECSVC_"
_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, for callers that start recsvc-serve as a process and
    must name its --port (demo, benchmarks, tests); `--port 0` lets a server pick one itself."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ConfigError(ValueError):
    """A config file, environment variable or flag has an invalid value (named in the message)."""


# ----------------------------------------------------------------------------- configuration


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Defaults, then the file, then RECSVC_* variables, then explicit overrides.

    `flags` maps an override's field to the command-line flag it came from (`port` -> `--port`),
    so a bad value is reported as the flag the user typed, not as a field they never saw.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data.update(_read_config_file(Path(path)))
    try:
        cfg = from_dict(ServeConfig, data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    if isinstance(cfg.processes, str):
        cfg = replace(cfg, processes=parse_processes(cfg.processes, f"config file {path}: processes"))
    env_values = _env_overrides(os.environ if env is None else env)
    cfg = replace(cfg, **env_values)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = replace(cfg, **given)
    _check(cfg, {k: flag for k, flag in (flags or {}).items() if k in given})
    return cfg


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = read_mapping(path, "config file")
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    data = data.get("serve", data)  # accept either a bare section or {"serve": {...}}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: 'serve' must be a mapping")
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(ServeConfig):
        name = ENV_PREFIX + f.name.upper()
        if name in env:
            if f.name == "processes":
                out[f.name] = parse_processes(env[name], f"environment variable {name}")
            else:
                out[f.name] = _coerce(name, env[name], str(f.type))
    return out


def parse_processes(raw: str, where: str) -> int:
    """ServeConfig.processes as written in a config file, variable or flag (`where`): an integer,
    or 'auto' (= 0, one per usable core)."""
    if raw.strip().lower() == "auto":
        return 0
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{where} must be an integer or 'auto', got {raw!r}") from None


def _coerce(name: str, raw: str, annotation: str) -> Any:
    """Parse an environment string as the field's annotated type ("int | None", "bool", ...)."""
    kinds = [part.strip() for part in annotation.split("|")]
    if "None" in kinds and raw.strip().lower() in ("", "none", "null"):
        return None
    kind = next((k for k in kinds if k != "None"), "str")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not a valid {kind}: {exc}") from exc
    return raw


def _check(cfg: ServeConfig, flags: Mapping[str, str]) -> None:
    """Range checks; a field set by a flag is named as that flag (see load_config)."""

    def name_of(field: str) -> str:
        return flags.get(field, f"ServeConfig.{field}")

    positive = (
        "max_k",
        "default_k",
        "max_in_flight",
        "workers",
        "max_batch_events",
        "max_id_chars",
        "max_batch",
        "batch_dispatchers",
    )
    if not isinstance(cfg.processes, int) or cfg.processes < 0:
        raise ConfigError(
            f"{name_of('processes')} must be >= 0 (0 = one per usable core), got {cfg.processes}"
        )
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name_of(name)} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"{name_of('port')} must be 0..65535, got {cfg.port}")
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError(f"{name_of('metrics_port')} must be 0..65535 (0 = off), got {cfg.metrics_port}")
    if cfg.batch_linger_ms < 0:
        raise ConfigError(f"ServeConfig.batch_linger_ms must be >= 0, got {cfg.batch_linger_ms}")
    if cfg.switch_interval_ms < 0:
        raise ConfigError(f"ServeConfig.switch_interval_ms must be >= 0, got {cfg.switch_interval_ms}")
    if cfg.event_loop not in EVENT_LOOPS:
        raise ConfigError(
            f"{name_of('event_loop')} must be one of {', '.join(EVENT_LOOPS)}, got {cfg.event_loop!r}"
        )
    if cfg.reload_poll_s <= 0:
        raise ConfigError(f"ServeConfig.reload_poll_s must be > 0, got {cfg.reload_poll_s}")
    if not cfg.pseudonym_key:
        raise ConfigError("ServeConfig.pseudonym_key must not be empty")


# ----------------------------------------------------------------------------- server

EVENT_LOOPS = ("uvloop", "asyncio")
T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T], kind: str) -> T:
    """Run the server's coroutine on the configured event loop (ServeConfig.event_loop).

    Why uvloop by default: every RPC costs the event loop a few wake-ups and callbacks, and
    libuv's loop does that work in C; grpc.aio supports it. Where it is not installed (it has no
    Windows build) the server says so once and runs on asyncio's loop.
    """
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("event_loop=uvloop but uvloop is not installed; using asyncio's event loop")
        else:
            log.info("event loop: uvloop %s", uvloop.__version__)
            return uvloop.run(main)
    log.info("event loop: asyncio")
    return asyncio.run(main)


def set_switch_interval(ms: float) -> None:
    """Set the GIL switch interval (process-wide; ServeConfig.switch_interval_ms, 0 = leave it).

    Why: with CPython's 5 ms default, the event loop thread that answers gRPC I/O waits up to 5 ms
    for the GIL each time a worker is inside a batch of numpy-heavy Python, several times per
    request, which is what drove p99 at half load (see benchmarks/bench_serve.py).
    """
    if ms > 0:
        sys.setswitchinterval(ms / 1000.0)


class RecsvcServer:
    """One running service: gRPC server, health, reflection, model manager, event store, metrics."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        loader: Callable[[Path], LoadedModel] = load_model,
        commit_signal: CommitSignal | None = None,
    ) -> None:
        """`loader` turns a bundle directory into a model (benchmarks serve in-memory bundles).

        `commit_signal`: one of several processes sharing the event store (server_processes).
        """
        self.config = config
        self.metrics = ServingMetrics()
        self.executor = ThreadPoolExecutor(
            max_workers=config.workers,
            thread_name_prefix="recsvc-worker",
            initializer=limit_this_thread,
            initargs=(config.compute_threads,),
        )
        self.events = EventStore(config.events_db)
        self.models = ModelManager(
            config.bundles,
            self.events,
            keep_previous=config.keep_previous_bundle,
            loader=loader,
            listener=self._on_model_change,
            commit_signal=commit_signal,
        )
        self.router, self.exposures = _experiments(config)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopped = False
        self.serving = asyncio.Event()  # set once health first reports SERVING

    async def start(self) -> int:
        """Bind, start answering (NOT_SERVING), load the bundle, then report SERVING; returns the port.

        One of several processes (`processes` != 1) loads first and binds after, when it can.
        """
        limit_compute_threads(self.config.compute_threads)
        # Bundle loads, warm-ups and admin reloads run in asyncio.to_thread: the same per-thread
        # FAISS cap as the request workers, so a hot swap does not oversubscribe a busy server.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(
                thread_name_prefix="recsvc-admin",
                initializer=limit_this_thread,
                initargs=(self.config.compute_threads,),
            )
        )
        set_switch_interval(self.config.switch_interval_ms)
        server = grpc.aio.server(
            options=[
                # Several processes share the port (the kernel spreads connections); a single
                # process must fail to bind a port someone else holds.
                ("grpc.so_reuseport", 1 if self.config.processes != 1 else 0),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ]
        )
        servicer = RecommenderServicer(
            models=self.models,
            config=self.config,
            metrics=self.metrics,
            executor=self.executor,
            router=self.router,
            exposures=self.exposures,
        )
        self.servicer = servicer
        pb_grpc.add_RecommenderServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loaded: bool | None = None
        if self.config.processes != 1:
            # Several processes share the port and the kernel hands each new connection to any
            # listening one: a (re)starting process listens only once it can answer, if it can.
            loaded = await self._load_ready()
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.60 raises where older versions returned port 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind {address}: the port is in use or the address is not local")
        await server.start()
        self._server = server
        log.info(
            "gRPC listening on %s:%d (%s)",
            self.config.host,
            self.port,
            "bundle loaded" if loaded else "NOT_SERVING until a bundle is loaded",
        )
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port, self.config.host)
        if loaded is None:
            loaded = await self._load_ready()
        if loaded:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._poller = asyncio.create_task(self._poll_bundles(), name="recsvc-bundle-poller")
        return self.port

    async def _load_ready(self) -> bool:
        """Load what CURRENT names and the experiments' pinned versions; False (logged; the
        poller keeps trying) when CURRENT cannot be loaded."""
        try:
            await asyncio.to_thread(self.models.reload)
        except Exception as exc:
            log.error("no bundle served yet (%s); polling %s/CURRENT", exc, self.config.bundles)
            return False
        await self._pin_variant_versions()
        return True

    async def _pin_variant_versions(self) -> None:
        if self.router is None:
            return
        versions = {v.bundle_version for e in self.router.experiments for v in e.variants if v.bundle_version}
        for version in sorted(versions):
            try:
                await asyncio.to_thread(self.models.pin, version)
            except Exception as exc:
                log.error("cannot load bundle %s named by an experiment variant: %s", version, exc)

    async def _poll_bundles(self) -> None:
        """Watch BUNDLES/CURRENT; a new version is loaded and warmed beside the old, then swapped."""
        while not self._stopped:
            await asyncio.sleep(self.config.reload_poll_s)
            was_ready = self.models.ready
            try:
                model = await asyncio.to_thread(self.models.poll_current)
            except Exception:
                log.exception("bundle poll failed; keeping the current model")
                continue
            if model is not None and not was_ready:
                await self._pin_variant_versions()
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _on_model_change(self, outcome: str, version: str) -> None:
        self.metrics.reloads.labels(outcome).inc()
        if outcome in ("loaded", "rollback", "pinned") and self.models.ready:
            self.metrics.set_bundle(self.models.active.version, len(self.models.loaded_versions()))

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if status == health_pb2.HealthCheckResponse.SERVING:
            self.serving.set()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING first, then let in-flight RPCs finish for up to `grace` seconds."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
            await self.servicer.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.metrics.stop_http()
        self.events.close()
        if self.exposures is not None:
            self.exposures.close()
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _experiments(config: ServeConfig) -> tuple[ExperimentRouter | None, ExposureLog | None]:
    """Experiment router + exposure log when `config.experiments` names a YAML file."""
    if not config.experiments:
        return None, None
    return ExperimentRouter.from_file(config.experiments), ExposureLog(config.exposures_db)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsvc-serve",
        description="Serve recommendations over gRPC from the bundle named by BUNDLES/CURRENT "
        "(hot-reloaded when CURRENT changes). Every ServeConfig field can also be set with RECSVC_<FIELD>.",
    )
    parser.add_argument(
        "--bundles", help="bundles root holding <version>/ folders and CURRENT (default: ./bundles)"
    )
    parser.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    parser.add_argument(
        "--config", help="JSON or YAML file with ServeConfig fields (optionally under 'serve:')"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics port (0 disables; default 9095)"
    )
    parser.add_argument("--events-db", help="SQLite file for durable live events (default events.sqlite)")
    parser.add_argument(
        "--experiments",
        help="experiments YAML file; enables A/B assignment and exposure logging to the SQLite file "
        "exposures.sqlite in the working directory (set another with RECSVC_EXPOSURES_DB or "
        "exposures_db in --config)",
    )
    parser.add_argument(
        "--workers", type=int, help="threads running the CPU-heavy recommendation work (per process)"
    )
    parser.add_argument(
        "--processes",
        help="server processes sharing the port (SO_REUSEPORT), each with its own models, workers "
        "and max_in_flight; 'auto' or 0 = one per usable core; default 1 (no supervisor)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default INFO)",
    )
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    server = RecsvcServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("recsvc-serve ready on port %d", server.port)
    await stop.wait()
    log.info("shutdown signal received; draining for up to %.1f s", config.shutdown_grace_s)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    overrides: dict[str, Any] = {
        "bundles": args.bundles,
        "port": args.port,
        "host": args.host,
        "metrics_port": args.metrics_port,
        "events_db": args.events_db,
        "experiments": args.experiments,
        "workers": args.workers,
    }
    try:
        if args.processes is not None:
            overrides["processes"] = parse_processes(args.processes, "--processes")
        flags = {field: "--" + field.replace("_", "-") for field in overrides}
        config = load_config(args.config, overrides=overrides, flags=flags)
        if not Path(config.bundles).is_dir():
            raise ConfigError(
                f"bundles directory {config.bundles} does not exist (train a model or pass --bundles)"
            )
        if config.processes != 1:
            from recsvc.server_processes import SupervisorError, supervise

            try:
                return supervise(config, log_level=args.log_level)
            except SupervisorError as exc:
                print(f"recsvc-serve: error: {exc}", file=sys.stderr)
                return 2
        run_event_loop(serve(config), config.event_loop)
    except (ConfigError, EventStoreError, ExposureLogError, ExperimentConfigError, OSError) as exc:
        print(f"recsvc-serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
