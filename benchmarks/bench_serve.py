"""Serving benchmark: Recommend vs the gRPC floor (Echo) at 10k / 100k / 1M synthetic items.

For each catalogue size a server process builds an in-memory bundle from REAL parts (Catalog,
ItemIndex (FAISS: exact up to `IndexConfig.exact_max_items`, its `ann_kind` above), LightGBM
Ranker trained on random features, histories / item stats / co-occurrence from synthetic
interactions) with random unit item embeddings, and serves it with the real `RecsvcServer` on
loopback. This process drives it with a grpc.aio client:

1. Echo (same request, same-sized response, no compute) with N requests in flight -> floor rps,
   measured against each size's server right before its Recommend phase;
2. Recommend with N in flight -> max rps; ratio = Recommend rps / Echo rps (target >= 0.35);
3. Recommend open-loop at half that max rate -> p50 / p99 latency (target p99 <= 10 ms);
4. per-stage breakdown from the server's own `timings_ms` in the responses;
5. the server process's CPU per Recommend and its mean micro-batch size in each phase: on a
   shared machine these move far less than rps and p99, so compare them first.

`--profile DIR` adds a CPU-time cProfile of every server thread during the Recommend phases
(printed, and saved as DIR/server-<items>.pstats). `--ab-setting switch_interval_ms|batch_linger_ms
--ab-values A B` then serves both values alternately in the same server (A B A B ...), so the
machine's other load hits both alike.

`--processes N` serves with the real `recsvc-serve --processes N` (a supervisor and N server
processes sharing the port) from a bundle published on disk (bench_batch's
`publish_synthetic_bundle`: the same synthetic parts saved through the real publish path, with
20k synthetic users); `--on-disk` does the same for N = 1. The client then opens `--channels`
connections (default: one per process, as a single process gets one), spread evenly over the
processes (the kernel spreads connections by hash; uneven ones are reopened), and sends requests
over them in turn; Echo runs on the same servers and connections as Recommend. Server CPU
is the sum over the supervisor and all its processes (/proc), batches come from the aggregated
/metrics. Default N = 1 (in-memory bundle, one connection) keeps older figures comparable.

Everything is bounded: each phase runs `--seconds` or `--max-requests`, whichever comes first.
Loopback only; the numbers depend on the machine (and on its other users).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import json
import logging
import os
import pstats
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_serve")

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
VERSION = "20250101T000000Z"
N_CATEGORIES = 60


# ----------------------------------------------------------------------------- server side


def synthetic_bundle(n_items: int, dim: int, n_users: int, candidates: int, seed: int, workdir: Path) -> Any:
    """A LoadedBundle of real serving parts over a random catalogue (see module docstring)."""
    import polars as pl

    from recsvc.catalog import Catalog
    from recsvc.config import DAY, CandidateConfig, IndexConfig, RankerConfig, TrainConfig
    from recsvc.features import FEATURE_NAMES
    from recsvc.ranker import Ranker
    from recsvc.retrieval import ItemIndex
    from recsvc.user_tower import TowerParams
    from training.train_ranker import state_at

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    item_ids = [f"i{i:07d}" for i in range(n_items)]
    items = pl.DataFrame(
        {
            "item_id": item_ids,
            "title": [f"item {i}" for i in range(n_items)],
            "category": [f"c{i % N_CATEGORIES}" for i in range(n_items)],
        }
    )
    catalog = Catalog.from_items(items, ("category",))
    emb = rng.standard_normal((n_items, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # ann + repeat + popular + co-occurrence proposals, capped at `candidates` (the rerank size).
    cand_cfg = CandidateConfig(
        ann=candidates, repeat=50, popular=50, cooccurrence=100, max_candidates=candidates
    )
    index_cfg = IndexConfig(hnsw_m=16, hnsw_ef_construction=40, hnsw_ef_search=96, use_gpu="never")
    cfg = TrainConfig(candidates=cand_cfg, index=index_cfg)
    index = ItemIndex.build(emb, index_cfg)
    log.info("index over %d items built in %.1f s", n_items, time.perf_counter() - t0)

    # Interactions: Zipf-like item popularity, 20 events per user over two weeks.
    end = 1_735_689_600
    n_events = n_users * 20
    popularity = rng.zipf(1.3, size=n_events) % n_items
    users = np.repeat(np.arange(n_users), 20)
    interactions = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": [item_ids[i] for i in popularity],
            "timestamp": np.sort(rng.integers(end - 14 * DAY, end, size=n_events)).astype(np.int64),
            "weight": rng.choice(np.array([1.0, 2.0, 8.0], dtype=np.float32), size=n_events),
        }
    )
    state = state_at(interactions, catalog, end, cand_cfg)

    history_len = cfg.encoder.history_len
    tower = TowerParams(
        query=np.zeros(dim, np.float32),
        age_coef=np.zeros((), np.float32),
        weight_coef=np.zeros((), np.float32),
        position_bias=np.zeros(history_len, np.float32),
        linear=np.zeros((dim, dim), np.float32),
        bias=np.zeros(dim, np.float32),
    )
    # A production-sized ranker (default RankerConfig: 63 leaves, up to 300 trees) on random data.
    groups = np.full(200, 50)
    features = rng.standard_normal((int(groups.sum()), len(FEATURE_NAMES))).astype(np.float32)
    grades = rng.integers(0, 3, size=len(features))
    ranker_cfg = replace(RankerConfig(), min_data_in_leaf=5)
    if hasattr(ranker_cfg, "num_threads"):  # one training thread: the box is shared with the benchmark
        ranker_cfg = replace(ranker_cfg, num_threads=1)
    ranker = Ranker.train(
        features, grades, groups, None, None, None, ranker_cfg, feature_names=list(FEATURE_NAMES)
    )
    log.info("bundle with %d items ready in %.1f s", n_items, time.perf_counter() - t0)
    return state.bundle(
        path=workdir,
        version=VERSION,
        config=cfg,
        catalog=catalog,
        item_emb=emb,
        index=index,
        tower=tower,
        ranker=ranker,
        encoder_dir=workdir / "no-encoder",
        manifest={"data_end_ts": end, "metrics": {}, "created_at": "synthetic"},
    )


def run_server_child(args: argparse.Namespace) -> int:
    """Child process: build the bundle, serve it, print READY <port>, run until stdin closes."""
    from recsvc.config import ServeConfig
    from recsvc.model_manager import LoadedModel
    from recsvc.recommender import Recommender
    from recsvc.server import RecsvcServer, run_event_loop

    workdir = Path(args.workdir)
    root = workdir / "bundles"
    (root / VERSION).mkdir(parents=True, exist_ok=True)
    (root / VERSION / "manifest.json").write_text("{}", encoding="utf-8")
    (root / "CURRENT").write_text(VERSION, encoding="utf-8")
    bundle = synthetic_bundle(args.items, args.dim, args.users, args.candidates, args.seed, workdir)

    def loader(_path: Path) -> LoadedModel:
        return LoadedModel(
            VERSION, bundle, Recommender(bundle), frozenset({"view", "click", "purchase"}), time.time()
        )

    config = ServeConfig(
        bundles=str(root),
        port=0,
        metrics_port=0,
        events_db=str(workdir / "events.sqlite"),
        workers=args.workers,
        max_batch=args.max_batch,
        batch_dispatchers=args.batch_dispatchers,
        **({} if args.switch_interval_ms is None else {"switch_interval_ms": args.switch_interval_ms}),
        **({} if args.batch_linger_ms is None else {"batch_linger_ms": args.batch_linger_ms}),
        max_in_flight=max(64, args.concurrency * 4),
        reload_poll_s=3600,
    )

    profiles = ThreadProfiles() if args.profile else None

    async def serve() -> None:
        server = RecsvcServer(config, loader=loader)
        if profiles is not None:
            server.executor = ProfilingExecutor(profiles, config.workers, config.compute_threads)
        await server.start()
        print(f"READY {server.port}", flush=True)
        # Control lines from the parent: PROFILE-ON before the Recommend phases (after Echo),
        # SET <setting> <value> for the interleaved --ab-setting comparison, STATS for the CPU and
        # batch counters; EOF stops the server.
        while line := await asyncio.to_thread(sys.stdin.readline):
            command, *rest = line.split() or [""]
            if command == "PROFILE-ON" and profiles is not None:
                profiles.start()
            elif command == "SET":
                apply_setting(server, rest[0], float(rest[1]))
            elif command == "STATS":
                print(f"STATS {server_stats(server)}", flush=True)
        await server.stop(grace=1.0)  # joins the worker threads, so their profiles are complete
        if profiles is not None:
            profiles.dump(Path(args.profile) / f"server-{args.items}.pstats")

    run_event_loop(serve(), config.event_loop)  # the loop recsvc-serve runs on
    return 0


AB_SETTINGS = ("switch_interval_ms", "batch_linger_ms")


def apply_setting(server: Any, name: str, value: float) -> None:
    """Change one A/B-able ServeConfig setting of a running server (--ab-setting)."""
    if name == "switch_interval_ms":
        sys.setswitchinterval(value / 1000.0 if value > 0 else 0.005)
    elif name == "batch_linger_ms":
        batcher = server.servicer._batcher
        if batcher is not None:
            batcher.linger_s = value / 1000.0
    else:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(AB_SETTINGS)}")


def server_stats(server: Any) -> str:
    """'<process CPU s> <batches> <batched requests>': CPU per request and batch size, which a
    shared machine's load disturbs far less than rps and latency."""
    registry = server.metrics.registry
    batches = registry.get_sample_value("recsvc_batch_size_count") or 0.0
    batched = registry.get_sample_value("recsvc_batch_size_sum") or 0.0
    return f"{time.process_time():.6f} {batches:.0f} {batched:.0f}"


class ThreadProfiles:
    """CPU-time cProfile of every server thread (cProfile only sees the thread that enabled it)."""

    def __init__(self) -> None:
        self.active = False
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def start(self) -> None:
        """Profile the calling (event loop) thread; worker threads join on their next task."""
        self.active = True
        self.enable_here()

    def enable_here(self) -> None:
        if getattr(self._local, "profile", None) is not None:
            return
        profile = cProfile.Profile(time.thread_time)  # CPU time: the box is shared
        self._local.profile = profile
        with self._lock:
            self._profiles.append(profile)
        profile.enable()

    def dump(self, path: Path) -> None:
        """All threads' stats merged into one pstats file (call after the worker threads ended)."""
        with self._lock:
            profiles = list(self._profiles)
        if not profiles:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        pstats.Stats(*profiles).dump_stats(str(path))


class ProfilingExecutor(ThreadPoolExecutor):
    """The server's worker pool, each thread profiled from its first task after PROFILE-ON.

    Same thread set-up as `RecsvcServer`'s pool (per-thread OpenMP cap), so a profiled run
    measures the served configuration.
    """

    def __init__(self, profiles: ThreadProfiles, workers: int, compute_threads: int) -> None:
        from recsvc.compute_threads import limit_this_thread

        super().__init__(
            max_workers=workers,
            thread_name_prefix="recsvc-worker",
            initializer=limit_this_thread,
            initargs=(compute_threads,),
        )
        self._profiles = profiles

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return super().submit(self._profiled, fn, *args, **kwargs)

    def _profiled(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._profiles.active:
            self._profiles.enable_here()
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- client side


@dataclass
class Phase:
    name: str
    completed: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    response_bytes: list[int] = field(default_factory=list)  # every 16th answer's wire size

    server_cpu_s: float = 0.0  # server process CPU over the phase (with a stats probe)
    batches: float = 0.0
    batched: float = 0.0  # requests answered by those batches

    def absorb(self, other: Phase) -> None:
        """Pool another phase's counts and latencies into this one."""
        self.completed += other.completed
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms
        self.response_bytes += other.response_bytes
        self.server_cpu_s += other.server_cpu_s
        self.batches += other.batches
        self.batched += other.batched

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_s * 1000.0 / self.completed if self.completed else float("nan")

    @property
    def mean_batch(self) -> float:
        return self.batched / self.batches if self.batches else float("nan")

    @property
    def rps(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def _requests(n_users: int, k: int, n: int, seed: int) -> list[Any]:
    from recsvc.client import recommend_request

    rng = np.random.default_rng(seed)
    # 90% known users (personalised path), 10% unknown (popularity fallback).
    ids = [f"u{u}" if rng.random() < 0.9 else f"new{u}" for u in rng.integers(0, n_users, size=n)]
    return [recommend_request(user, k) for user in ids]


async def closed_loop(
    method: Any, reqs: list[Any], concurrency: int, seconds: float, max_requests: int, name: str
) -> Phase:
    """`concurrency` requests always in flight; as fast as the server answers."""
    phase = Phase(name)
    stop_at = time.perf_counter() + seconds
    counter = iter(range(max_requests))

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() >= stop_at:
                return
            t = time.perf_counter()
            try:
                resp = await method(reqs[i % len(reqs)], timeout=10)
            except Exception:
                phase.errors += 1
                continue
            phase.latencies_ms.append((time.perf_counter() - t) * 1000.0)
            phase.completed += 1
            if phase.completed % 16 == 0:
                phase.response_bytes.append(resp.ByteSize())
            for stage, ms in resp.timings_ms.items():
                phase.stage_ms.setdefault(stage, []).append(ms)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.seconds = time.perf_counter() - start
    return phase


async def open_loop(
    method: Any, reqs: list[Any], rate: float, seconds: float, max_requests: int, name: str
) -> Phase:
    """Requests sent on a fixed schedule at `rate`/s regardless of answers (no coordinated omission)."""
    phase = Phase(name)
    n = max(1, min(max_requests, int(rate * seconds)))
    interval = 1.0 / rate
    start = time.perf_counter()

    async def one(i: int, scheduled: float) -> None:
        try:
            resp = await method(reqs[i % len(reqs)], timeout=10)
        except Exception:
            phase.errors += 1
            return
        phase.latencies_ms.append((time.perf_counter() - scheduled) * 1000.0)
        phase.completed += 1
        if phase.completed % 16 == 0:
            phase.response_bytes.append(resp.ByteSize())
        for stage, ms in resp.timings_ms.items():
            phase.stage_ms.setdefault(stage, []).append(ms)

    tasks = []
    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    phase.seconds = time.perf_counter() - start
    return phase


class RoundRobin:
    """One RPC method over several channels (one TCP connection each), in turn."""

    def __init__(self, stubs: list[Any], name: str) -> None:
        self._methods = [getattr(stub, name) for stub in stubs]
        self._next = 0

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        method = self._methods[self._next]
        self._next = (self._next + 1) % len(self._methods)
        return method(request, **kwargs)


async def open_balanced_channels(port: int, n: int, processes: int) -> list[Any]:
    """`n` connections spread evenly over the server processes (n // processes each, at least 1).

    The kernel assigns each new connection to a process by a hash, so a few connections often
    land unevenly; GetModelInfo's `recsvc-server-pid` metadata says which process answered, and
    connections to a process that already has its share are closed and opened again.
    """
    import grpc

    from recsvc.servicer import SERVER_PID_METADATA
    from recsvc.v1 import recommender_pb2 as pb
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    def connect() -> Any:
        # A local subchannel pool gives each channel its own connection (else they would share one).
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])

    n = max(1, n)
    if processes <= 1:
        return [connect() for _ in range(n)]
    share = max(1, n // processes)
    by_pid: dict[str, list[Any]] = {}
    for _ in range(64 * n):
        channel = connect()
        call = pb_grpc.RecommenderStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        await call
        pid = dict(await call.trailing_metadata() or ()).get(SERVER_PID_METADATA, "?")
        if len(by_pid.setdefault(pid, [])) < share:
            by_pid[pid].append(channel)
        else:
            await channel.close()
        if len(by_pid) == processes and all(len(v) == share for v in by_pid.values()):
            break
    else:
        log.warning(
            "connections per server process: %s (wanted %d each)",
            {k: len(v) for k, v in by_pid.items()},
            share,
        )
    return [channel for group in by_pid.values() for channel in group]


async def drive(
    port: int,
    args: argparse.Namespace,
    with_echo: bool,
    control: Callable[[str], None] | None = None,
    stats: Callable[[], tuple[float, float, float]] | None = None,
) -> dict[str, Phase]:
    """Echo, Recommend saturated, Recommend at half that rate; then the optional A/B rounds.

    `stats` reads the server's (CPU seconds, batches, batched requests) around each Recommend phase.
    """

    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    reqs = _requests(args.users, args.k, 5_000, args.seed)
    out: dict[str, Phase] = {}
    channels = await open_balanced_channels(port, args.channels, args.processes)
    stubs = [pb_grpc.RecommenderStub(channel) for channel in channels]
    stub = argparse.Namespace(Recommend=RoundRobin(stubs, "Recommend"), Echo=RoundRobin(stubs, "Echo"))
    try:
        await closed_loop(stub.Recommend, reqs, args.concurrency, 1.0, 200, "warm-up")
        if with_echo:
            await closed_loop(stub.Echo, reqs, args.concurrency, 0.5, 500, "warm-up")
            out["echo"] = await measured(
                closed_loop(stub.Echo, reqs, args.concurrency, args.seconds, args.max_requests, "echo"), stats
            )
        if control is not None:
            control("PROFILE-ON")
        rec = await measured(
            closed_loop(stub.Recommend, reqs, args.concurrency, args.seconds, args.max_requests, "recommend"),
            stats,
        )
        out["recommend"] = rec
        rate = max(rec.rps / 2.0, 1.0)
        out["half_load"] = await measured(
            open_loop(stub.Recommend, reqs, rate, args.seconds, args.max_requests, "half-load"), stats
        )
        if args.fixed_rate:
            out["fixed_rate"] = await measured(
                open_loop(
                    stub.Recommend, reqs, args.fixed_rate, args.seconds, args.max_requests, "fixed-rate"
                ),
                stats,
            )
        if args.ab_setting is not None and control is not None:
            out |= await ab_rounds(stub, reqs, rate, args, control, stats)
    finally:
        for channel in channels:
            await channel.close()
    return out


async def measured(run: Any, stats: Callable[[], tuple[float, float, float]] | None) -> Phase:
    """Run a phase and record the server's CPU and batches spent on it.

    The load generator's own objects (imports, requests, earlier phases) are frozen out of the
    garbage collector first: its full collections took 70-100 ms, during which no answer is read,
    and the open-loop phase counted those stalls as the server's p99 (measured 2026-11-24).
    """
    gc.collect()
    gc.freeze()
    before = await asyncio.to_thread(stats) if stats is not None else None
    phase: Phase = await run
    if before is not None and stats is not None:
        after = await asyncio.to_thread(stats)
        phase.server_cpu_s, phase.batches, phase.batched = (a - b for a, b in zip(after, before))
    return phase


async def ab_rounds(
    stub: Any,
    reqs: list[Any],
    rate: float,
    args: argparse.Namespace,
    control: Callable[[str], None],
    stats: Callable[[], tuple[float, float, float]] | None,
) -> dict[str, Phase]:
    """`--ab-setting` at its two `--ab-values`, alternated in the same server (A B A B ...).

    Interleaving makes the machine's other load hit both alike; each round runs a saturated phase
    and an open-loop phase at the same offered rate (half the main phase's maximum), pooled per value.
    """
    out: dict[str, Phase] = {}
    seconds = max(args.seconds / 2.0, 1.0)
    for _ in range(args.ab_rounds):
        for name, value in zip("AB", args.ab_values):
            control(f"SET {args.ab_setting} {value}")
            await asyncio.sleep(0.1)
            label = f"{args.ab_setting}={value:g}"
            sat = await measured(
                closed_loop(stub.Recommend, reqs, args.concurrency, seconds, args.max_requests, label), stats
            )
            half = await measured(
                open_loop(stub.Recommend, reqs, rate, seconds, args.max_requests, label), stats
            )
            for kind, phase in (("saturated", sat), ("half", half)):
                pooled = out.setdefault(f"ab_{name}_{kind}", Phase(label))
                pooled.absorb(phase)
    return out


def start_child(n_items: int, args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-child",
        "--items", str(n_items),
        "--dim", str(args.dim),
        "--users", str(args.users),
        "--candidates", str(args.candidates),
        "--workers", str(args.workers),
        "--max-batch", str(args.max_batch),
        "--batch-dispatchers", str(args.batch_dispatchers),
        *([] if args.switch_interval_ms is None else ["--switch-interval-ms", str(args.switch_interval_ms)]),
        *([] if args.batch_linger_ms is None else ["--batch-linger-ms", str(args.batch_linger_ms)]),
        "--concurrency", str(args.concurrency),
        "--seed", str(args.seed),
        "--workdir", str(workdir),
        *(["--profile", str(Path(args.profile).resolve())] if args.profile else []),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    deadline = time.monotonic() + args.build_timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server for {n_items} items exited with code {proc.wait()} before READY")
        if line.startswith("READY "):
            return proc, int(line.split()[1])
    proc.kill()
    raise TimeoutError(f"server for {n_items} items not ready after {args.build_timeout} s")


def _scrape(metrics_port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _metric(body: str, name: str) -> float:
    """Sum of every sample named exactly `name` (any labels) in a text exposition."""
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def tree_cpu_s(root_pid: int) -> float:
    """User + system CPU seconds of `root_pid` and every live descendant (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields_ = raw[raw.rindex(")") + 2 :].split()
        ppid, utime, stime = int(fields_[1]), int(fields_[11]), int(fields_[12])
        stats[int(entry)] = (ppid, (utime + stime) / ticks)
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return total


def start_cli_server(
    n_items: int, args: argparse.Namespace, workdir: Path
) -> tuple[subprocess.Popen[str], int, Callable[[], tuple[float, float, float]]]:
    """`recsvc-serve --processes N` on a published synthetic bundle: the deployed path.

    Returns the supervisor (or single server) process, its port, and a stats probe: (CPU seconds
    of the whole process tree, batches, batched requests from the aggregated /metrics).
    """
    benchmarks = str(Path(__file__).resolve().parent)
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    from bench_batch import publish_synthetic_bundle

    root = workdir / "bundles"
    started = time.perf_counter()
    publish_synthetic_bundle(root, n_items, args.dim)
    log.info("published a %d-item synthetic bundle in %.1f s", n_items, time.perf_counter() - started)
    from recsvc.server import free_port

    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "RECSVC_EVENTS_DB": str(workdir / "events.sqlite"),
        "RECSVC_METRICS_PORT": str(metrics_port),
        "RECSVC_WORKERS": str(args.workers),
        "RECSVC_MAX_BATCH": str(args.max_batch),
        "RECSVC_BATCH_DISPATCHERS": str(args.batch_dispatchers),
        "RECSVC_MAX_IN_FLIGHT": str(max(64, args.concurrency * 4)),
        "RECSVC_RELOAD_POLL_S": "3600",
        **(
            {}
            if args.switch_interval_ms is None
            else {"RECSVC_SWITCH_INTERVAL_MS": str(args.switch_interval_ms)}
        ),
        **({} if args.batch_linger_ms is None else {"RECSVC_BATCH_LINGER_MS": str(args.batch_linger_ms)}),
    }
    cmd = [
        sys.executable, "-m", "recsvc.server", "--bundles", str(root), "--port", str(port),
        "--processes", str(args.processes), "--log-level", "WARNING",  # no per-request access log
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, text=True, cwd=REPO, env=env
    )
    deadline = time.monotonic() + args.build_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"recsvc-serve for {n_items} items exited with code {proc.returncode}")
        try:
            body = _scrape(metrics_port)
        except OSError:
            body = ""
        # Every process reports its active bundle (one series per pid with N > 1) once it serves.
        serving = sum(
            1 for line in body.splitlines() if line.startswith("recsvc_bundle_info") and line.endswith(" 1.0")
        )
        if serving >= max(1, args.processes):
            break
        time.sleep(0.25)
    else:
        proc.kill()
        raise TimeoutError(f"recsvc-serve for {n_items} items not serving after {args.build_timeout} s")

    def stats() -> tuple[float, float, float]:
        body = _scrape(metrics_port)
        return (
            tree_cpu_s(proc.pid),
            _metric(body, "recsvc_batch_size_count"),
            _metric(body, "recsvc_batch_size_sum"),
        )

    return proc, port, stats


def stop_cli_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()  # SIGTERM: graceful stop of every server process
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_stats(proc: subprocess.Popen[str]) -> tuple[float, float, float]:
    """The child's (CPU seconds, batches, batched requests) (see `server_stats`)."""
    send_control(proc, "STATS")
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("server child exited while asked for its stats")
        if line.startswith("STATS "):
            cpu, batches, batched = (float(x) for x in line.split()[1:])
            return cpu, batches, batched


def send_control(proc: subprocess.Popen[str], line: str) -> None:
    """One control line to the server child (PROFILE-ON is ignored without --profile)."""
    if proc.stdin is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()


def print_profile(path: Path, lines: int) -> None:
    """Top functions by own CPU time in the server child (all threads)."""
    if not path.exists():
        log.warning("no profile written at %s", path)
        return
    print(f"\nserver CPU profile {path} (top {lines} by own time; cumulative in the 4th column):")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(lines)


def stop_child(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def stage_table(phase: Phase) -> dict[str, dict[str, float]]:
    return {
        stage: {
            "mean_ms": float(np.mean(v)),
            "p50_ms": float(np.percentile(v, 50)),
            "p99_ms": float(np.percentile(v, 99)),
        }
        for stage, v in sorted(phase.stage_ms.items())
    }


def summarise(n_items: int, echo: Phase, phases: dict[str, Phase], processes: int = 1) -> dict[str, Any]:
    rec, half = phases["recommend"], phases["half_load"]
    return {
        "items": n_items,
        "echo_rps": round(echo.rps, 1),
        "recommend_rps": round(rec.rps, 1),
        "ratio_vs_echo": round(rec.rps / echo.rps, 3) if echo.rps else None,
        "half_load_rate_rps": round(half.completed / half.seconds, 1) if half.seconds else 0.0,
        "half_load_p50_ms": round(half.pct(50), 2),
        "half_load_p99_ms": round(half.pct(99), 2),
        "saturated_p50_ms": round(rec.pct(50), 2),
        "saturated_p99_ms": round(rec.pct(99), 2),
        "errors": rec.errors + half.errors,
        "processes": processes,
        "load_average_1m": round(os.getloadavg()[0], 2),  # other users of the machine at the time
        "stages_at_half_load": stage_table(half),
        "saturated_server_cpu_ms_per_request": round(rec.cpu_ms_per_request, 3),
        # the gRPC floor's own server CPU: what of a Recommend's CPU is the RPC, not the model
        "echo_server_cpu_ms_per_request": round(echo.cpu_ms_per_request, 3),
        "saturated_mean_batch": round(rec.mean_batch, 2),
        "half_load_server_cpu_ms_per_request": round(half.cpu_ms_per_request, 3),
        # "an echo RPC of the same response size": both sizes, measured, so the floor can be checked
        "echo_response_bytes": round(float(np.mean(echo.response_bytes)), 1) if echo.response_bytes else None,
        "recommend_response_bytes": round(float(np.mean(rec.response_bytes)), 1)
        if rec.response_bytes
        else None,
        **fixed_rate_summary(phases),
        **ab_summary(phases),
    }


def fixed_rate_summary(phases: dict[str, Phase]) -> dict[str, Any]:
    """p50 / p99 at `--fixed-rate`: the same offered load whatever the maximum, so two versions of
    the code compare at equal load (half load is half of each one's own maximum)."""
    fixed = phases.get("fixed_rate")
    if fixed is None:
        return {}
    return {
        "fixed_rate_rps": round(fixed.completed / fixed.seconds, 1) if fixed.seconds else 0.0,
        "fixed_rate_p50_ms": round(fixed.pct(50), 2),
        "fixed_rate_p99_ms": round(fixed.pct(99), 2),
        "fixed_rate_server_cpu_ms_per_request": round(fixed.cpu_ms_per_request, 3),
        "fixed_rate_errors": fixed.errors,
    }


def ab_summary(phases: dict[str, Phase]) -> dict[str, Any]:
    """Per A/B value: saturated rps, server CPU per request and batch size; p50/p99 at half load."""
    if "ab_A_half" not in phases:
        return {}
    return {
        "ab": {
            name: {
                "setting": phases[f"ab_{name}_half"].name,
                "saturated_rps": round(phases[f"ab_{name}_saturated"].rps, 1),
                "saturated_cpu_ms_per_request": round(phases[f"ab_{name}_saturated"].cpu_ms_per_request, 3),
                "saturated_mean_batch": round(phases[f"ab_{name}_saturated"].mean_batch, 2),
                "half_load_p50_ms": round(phases[f"ab_{name}_half"].pct(50), 2),
                "half_load_p99_ms": round(phases[f"ab_{name}_half"].pct(99), 2),
            }
            for name in ("A", "B")
        }
    }


def print_report(echo: Phase, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nserving benchmark: loopback, {args.concurrency} in flight, k={args.k}, {args.candidates} candidates, "
        f"dim={args.dim}, {args.processes} server process(es) x {args.workers} workers, "
        f"{args.channels} connection(s), max_batch={args.max_batch}, "
        f"dispatchers={args.batch_dispatchers}, switch interval={args.switch_interval_ms or 'default'} ms, "
        f"cpus={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f} (shared machine: numbers are indicative)"
    )
    print(
        f"Echo (gRPC floor, first server): {echo.rps:.0f} rps, p50 {echo.pct(50):.2f} ms, p99 {echo.pct(99):.2f} ms"
    )
    print(
        f"{'items':>9} {'echo rps':>8} {'rec rps':>8} {'ratio':>6} {'p50@half':>9} {'p99@half':>9} {'load':>5} {'target':>14}"
    )
    for r in rows:
        ok = (r["ratio_vs_echo"] or 0) >= 0.35 and r["half_load_p99_ms"] <= 10.0
        print(
            f"{r['items']:>9} {r['echo_rps']:>8.0f} {r['recommend_rps']:>8.0f} {r['ratio_vs_echo']:>6.2f} {r['half_load_p50_ms']:>8.2f}ms "
            f"{r['half_load_p99_ms']:>8.2f}ms {r['load_average_1m']:>5.1f} {'met' if ok else 'MISSED':>14}"
        )
    for r in rows:
        stages = ", ".join(f"{s} {v['mean_ms']:.2f}" for s, v in r["stages_at_half_load"].items())
        print(f"  stages (mean ms) @ {r['items']} items: {stages}")
    for r in rows:
        print(
            f"  server CPU per Recommend @ {r['items']} items: saturated "
            f"{r['saturated_server_cpu_ms_per_request']:.3f} ms (mean batch {r['saturated_mean_batch']:.2f}), "
            f"half load {r['half_load_server_cpu_ms_per_request']:.3f} ms; Echo {r['echo_server_cpu_ms_per_request']:.3f} ms"
        )
        print(
            f"  response bytes @ {r['items']} items: Echo {r['echo_response_bytes']}, Recommend {r['recommend_response_bytes']}"
        )
        if "fixed_rate_rps" in r:
            print(
                f"  fixed rate @ {r['items']} items: {r['fixed_rate_rps']:.0f} rps offered and answered, "
                f"p50 {r['fixed_rate_p50_ms']:.2f} ms, p99 {r['fixed_rate_p99_ms']:.2f} ms, "
                f"server CPU {r['fixed_rate_server_cpu_ms_per_request']:.3f} ms, errors {r['fixed_rate_errors']}"
            )
    for r in rows:
        if "ab" in r:
            a, b = r["ab"]["A"], r["ab"]["B"]
            print(
                f"  interleaved A/B @ {r['items']} items (B/A rps {b['saturated_rps'] / max(a['saturated_rps'], 1e-9):.2f}):"
            )
            for v in (a, b):
                print(
                    f"    {v['setting']:>24}: {v['saturated_rps']:6.0f} rps, {v['saturated_cpu_ms_per_request']:.3f} ms "
                    f"CPU/request, batch {v['saturated_mean_batch']:.2f}; half load p50 {v['half_load_p50_ms']:.2f} "
                    f"ms p99 {v['half_load_p99_ms']:.2f} ms"
                )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="catalogue sizes to serve"
    )
    p.add_argument("--seconds", type=float, default=4.0, help="duration of each measured phase (default 4)")
    p.add_argument(
        "--max-requests", type=int, default=20_000, help="cap on requests per phase (default 20000)"
    )
    p.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight in closed-loop phases (default 16)"
    )
    p.add_argument("--k", type=int, default=12, help="results per request (default 12)")
    p.add_argument(
        "--candidates", type=int, default=500, help="candidates reranked per request (default 500)"
    )
    p.add_argument(
        "--dim", type=int, default=64, help="embedding dimension of the synthetic catalogue (default 64)"
    )
    p.add_argument(
        "--users", type=int, default=10_000, help="synthetic users with 20 events each (default 10000)"
    )
    p.add_argument(
        "--workers", type=int, default=4, help="server worker threads (ServeConfig.workers; default 4)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="ServeConfig.max_batch: Recommend calls per recommend_many (1 = off)",
    )
    p.add_argument(
        "--batch-dispatchers",
        type=int,
        default=1,
        help="ServeConfig.batch_dispatchers: micro-batches computed at once (default 1)",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="ServeConfig.switch_interval_ms: the server's GIL switch interval (default: ServeConfig's)",
    )
    p.add_argument(
        "--ab-setting",
        choices=AB_SETTINGS,
        help="after the main phases, compare two values of this ServeConfig setting interleaved in the "
        "same server (saturated rps, server CPU per request, batch size, p99 at the same half-load rate)",
    )
    p.add_argument(
        "--ab-values", type=float, nargs=2, default=(1.0, 0.0), metavar=("A", "B"), help="the two values"
    )
    p.add_argument("--ab-rounds", type=int, default=3, help="A/B rounds per value (default 3)")
    p.add_argument(
        "--batch-linger-ms",
        type=float,
        default=None,
        help="ServeConfig.batch_linger_ms: wait for more requests before a non-full batch when "
        "saturated (default: ServeConfig's)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes (ServeConfig.processes); > 1 serves with `recsvc-serve --processes N` "
        "from a bundle on disk (default 1: the in-memory server, comparable with older figures)",
    )
    p.add_argument(
        "--on-disk",
        action="store_true",
        help="serve with recsvc-serve from a published bundle on disk also when --processes is 1 "
        "(compare 1 vs N processes on the same path)",
    )
    p.add_argument(
        "--channels",
        type=int,
        help="client connections, spread evenly over the server processes and used in turn "
        "(default: one per process); the kernel spreads connections, not requests, over processes",
    )
    p.add_argument(
        "--fixed-rate",
        type=float,
        default=None,
        help="also offer Recommend open-loop at this many requests/s and report its p50 / p99: the "
        "same load for every version compared (half load is half of each one's own maximum)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--build-timeout", type=float, default=900.0, help="seconds allowed to build one catalogue"
    )
    p.add_argument("--out", default="bench-out/serve.json", help="where to write the JSON results")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="cProfile the server's threads (CPU time) during the Recommend phases; "
        "writes DIR/server-<items>.pstats and prints the top lines",
    )
    p.add_argument(
        "--profile-lines", type=int, default=25, help="profile lines printed per size (default 25)"
    )
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--items", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.serve_child:
        logging.getLogger("recsvc.access").setLevel(logging.WARNING)
        return run_server_child(args)
    import tempfile

    if args.processes < 1:
        print("bench_serve: error: --processes must be >= 1", file=sys.stderr)
        return 2
    on_disk = args.on_disk or args.processes > 1
    if on_disk and (args.profile or args.ab_setting):
        print(
            "bench_serve: error: --profile and --ab-setting need the in-memory server (--processes 1 without --on-disk)",
            file=sys.stderr,
        )
        return 2
    if args.channels is None:
        args.channels = args.processes

    rows: list[dict[str, Any]] = []
    echo: Phase | None = None
    for n_items in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            log.info("building and serving a %d-item catalogue (%d processes)", n_items, args.processes)
            if on_disk:
                proc, port, stats = start_cli_server(n_items, args, Path(tmp))
                try:
                    phases = asyncio.run(drive(port, args, with_echo=True, stats=stats))
                finally:
                    stop_cli_server(proc)
            else:
                proc, port = start_child(n_items, args, Path(tmp))
                try:
                    # Echo against every server, just before its Recommend phase: on a shared machine the
                    # load changes between sizes, so each ratio compares two adjacent measurements.
                    phases = asyncio.run(
                        drive(
                            port,
                            args,
                            with_echo=True,
                            control=functools.partial(send_control, proc),
                            stats=functools.partial(read_stats, proc),
                        )
                    )
                finally:
                    stop_child(proc)
        echo = phases["echo"] if echo is None else echo
        rows.append(summarise(n_items, phases["echo"], phases, args.processes))
        log.info(
            "%d items: %s",
            n_items,
            json.dumps({k: v for k, v in rows[-1].items() if k != "stages_at_half_load"}),
        )
    assert echo is not None
    if args.profile:
        for n_items in args.sizes:
            print_profile(Path(args.profile) / f"server-{n_items}.pstats", args.profile_lines)
    print_report(echo, rows, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "echo": {"rps": echo.rps, "p50_ms": echo.pct(50), "p99_ms": echo.pct(99)},
        "sizes": rows,
        "settings": {k: v for k, v in vars(args).items() if k not in ("serve_child", "items", "workdir")},
        "cpus": os.cpu_count(),
    }
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
