"""Batch candidate generation throughput vs per-user gRPC `Recommend`, same bundle, same run.

Why: `recsvc-batch` exists because calling the online service once per user is too slow for
nightly candidate sets (issue 5: users/s at 100k items, target >= 5x per-user gRPC). Both paths
run on the same trained bundle (H&M: 105k items), interleaved in `--rounds` rounds so a change
in the machine's load hits both:

1. `recsvc.batch.run_batch` (chunked `recommend_many`) over `--users` bundle users, with one
   process and with `--workers` forked worker processes (the CLI default: usable cores);
2. the real `recsvc-serve` (server defaults; one child process on loopback, started once),
   driven by the real client calling `Recommend` once per user, sequentially and with
   `--concurrency` calls in flight (the server micro-batches those);
3. ratio = batch (`--workers` processes) / best of the two gRPC figures, per round and pooled
   (target >= 5x); also users per CPU-second of each path (batch: this process and its workers;
   gRPC: the server process only), which the machine's other users disturb far less than wall
   time; and an equality check: batch item lists must equal the server's for every gRPC user.

The bundle comes from `benchmarks/bench_pipeline.py` (bench-out/pipeline/bundles) or `--bundle`.
Without one, a synthetic bundle of `--synthetic-items` (default 100k) items is published to a
temporary bundles root: REAL parts (FAISS index, production-sized LightGBM ranker, histories,
stats, co-occurrence; built by bench_serve.synthetic_bundle) over random 384-d item embeddings,
so the throughput figures hold at 100k items even before a model is trained. Load averages are
printed beside every figure; numbers depend on the machine and its other users.

    .venv/bin/python benchmarks/bench_batch.py [--bundle DIR] [--users 5000] [--grpc-users 500]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from recsvc import bundle as bundle_mod  # noqa: E402
from recsvc.batch import run_batch, thread_budget  # noqa: E402
from recsvc.client import RecsvcClient  # noqa: E402
from recsvc.compute_threads import usable_cores  # noqa: E402
from recsvc.config import ServeConfig, to_dict  # noqa: E402
from recsvc.recommender import Recommender, RecommendRequest  # noqa: E402
from recsvc.server import free_port  # noqa: E402

DEFAULT_BUNDLE = REPO / "bench-out" / "pipeline" / "bundles"
TARGET_RATIO = 5.0
log = logging.getLogger("bench_batch")


class ServerProcess:
    """`python -m recsvc.server` on loopback in a child process (its own GIL and CPU share)."""

    def __init__(self, bundles_root: Path, workdir: Path, workers: int | None, processes: int = 1) -> None:
        self.port = free_port()
        self.processes = processes
        cmd = [
            sys.executable,
            "-m",
            "recsvc.server",
            "--bundles",
            str(bundles_root),
            "--port",
            str(self.port),
        ]
        cmd += ["--metrics-port", "0", "--events-db", str(workdir / "events.sqlite")]
        cmd += ["--log-level", "WARNING"] + (["--workers", str(workers)] if workers else [])
        cmd += ["--processes", str(processes)]
        self.proc = subprocess.Popen(cmd, cwd=REPO)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the server so far (all threads; with --processes N, the
        supervisor and its server processes); None off Linux."""
        from bench_serve import tree_cpu_s

        try:
            return tree_cpu_s(self.proc.pid)
        except OSError:  # no /proc
            return None

    def wait_until_serving(self, timeout: float) -> None:
        """Health SERVING, or a clear error as soon as the server process has died."""
        with RecsvcClient(self.target, timeout=10.0) as probe:
            try:
                probe.wait_until_serving(timeout=timeout, alive=lambda: self.proc.poll() is None)
            except RuntimeError:
                raise RuntimeError(
                    f"recsvc-serve exited with code {self.proc.returncode} before serving"
                ) from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Phase:
    """One measured run: users/s wall, users per CPU-second, load average when it ended."""

    name: str
    users: int
    seconds: float
    cpu_seconds: float | None
    load: float

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds

    @property
    def users_per_cpu_s(self) -> float | None:
        return self.users / self.cpu_seconds if self.cpu_seconds else None

    def row(self) -> dict:
        cpu = self.users_per_cpu_s
        return {
            "phase": self.name,
            "users": self.users,
            "seconds": round(self.seconds, 2),
            "users_per_s": round(self.users_per_s, 1),
            "users_per_cpu_s": round(cpu, 1) if cpu else None,
            "load_1min": round(self.load, 2),
        }


def _own_and_children_cpu() -> float:
    """CPU of this process plus its reaped children (run_batch joins its workers before returning)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def batch_phase(
    recommender: Recommender, users: list[str], out: Path, args: argparse.Namespace, workers: int
) -> Phase:
    cpu = _own_and_children_cpu()
    summary = run_batch(
        recommender, users, out, k=args.k, chunk_size=args.chunk_size, workers=workers, progress=False
    )
    cpu = _own_and_children_cpu() - cpu
    name = f"recsvc-batch x{workers} process{'es' if workers > 1 else ''}"
    return Phase(name, summary.users, summary.seconds, cpu, os.getloadavg()[0])


def grpc_phase(
    server: ServerProcess, users: list[str], k: int, concurrency: int
) -> tuple[Phase, dict[str, list[str]]]:
    """Recommend once per user with `concurrency` client threads; CPU counted is the server's only
    (the client's is the caller's cost, so the baseline is, if anything, flattered)."""
    answers: dict[str, list[str]] = {}
    # one connection per client thread when the server has several processes, so they share the load
    own = server.processes != 1
    clients = [RecsvcClient(server.target, timeout=30.0, own_connection=own) for _ in range(concurrency)]

    def work(i: int) -> None:
        client = clients[i]
        for user in users[i::concurrency]:
            answers[user] = [it.item_id for it in client.recommend(user, k).items]

    cpu = server.cpu_seconds()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(work, range(concurrency)))
    seconds = time.perf_counter() - start
    cpu_after = server.cpu_seconds()
    for c in clients:
        c.close()
    name = "gRPC sequential" if concurrency == 1 else f"gRPC {concurrency} in flight"
    used = cpu_after - cpu if cpu is not None and cpu_after is not None else None
    return Phase(name, len(users), seconds, used, os.getloadavg()[0]), answers


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundles root or folder (default: %(default)s)"
    )
    p.add_argument("--users", type=int, default=5_000, help="users in each batch run (default: %(default)s)")
    p.add_argument(
        "--grpc-users", type=int, default=500, help="users called over gRPC per run (default: %(default)s)"
    )
    p.add_argument("--k", type=int, default=100, help="candidates per user (default: %(default)s)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="batch chunk size (default: %(default)s; throughput is flat from 128 to 4096 users per chunk, "
        "and with --users 5000 bigger chunks leave a worker idle on the last one)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="batch worker processes (default: recsvc-batch's default, the usable cores: %(default)s)",
    )
    p.add_argument(
        "--server-workers",
        type=int,
        default=None,
        help=f"recsvc-serve compute threads (default: the server's own, {ServeConfig().workers})",
    )
    p.add_argument(
        "--server-processes",
        type=int,
        default=1,
        help="recsvc-serve --processes (default: %(default)s, the server's default; with more, each "
        "client thread gets its own connection so the load spreads over the processes)",
    )
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=[4, 16],
        help="comma-separated Recommend calls in flight, one concurrent gRPC run each; the server "
        "micro-batches concurrent calls, so more in flight is a stronger baseline (default: 4,16)",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of every phase (default: %(default)s)"
    )
    p.add_argument(
        "--synthetic-items",
        type=int,
        default=100_000,
        help="catalogue size of the synthetic bundle used when there is no trained one (default: %(default)s)",
    )
    p.add_argument("--synthetic-dim", type=int, default=384, help="embedding size of the synthetic bundle")
    p.add_argument("--seed", type=int, default=0, help="user sample seed")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "batch.json", help="JSON results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-batch-bundle-") as synthetic_root:
        try:
            bundle_dir = bundle_mod.resolve(args.bundle)
        except bundle_mod.BundleError as exc:
            log.info(
                "no trained bundle (%s); publishing a synthetic %d-item bundle", exc, args.synthetic_items
            )
            bundle_dir = publish_synthetic_bundle(
                Path(synthetic_root), args.synthetic_items, args.synthetic_dim
            )
        return measure(args, bundle_dir)


def publish_synthetic_bundle(root: Path, n_items: int, dim: int) -> Path:
    """Save bench_serve's synthetic LoadedBundle part by part and publish it (real loader path)."""
    from bench_serve import synthetic_bundle

    from recsvc.features import FEATURE_NAMES
    from recsvc.user_tower import save_params
    from tests.helpers.tiny_bert import make_tiny_bert

    staging = bundle_mod.new_staging_dir(root)
    b = synthetic_bundle(n_items, dim, n_users=20_000, candidates=500, seed=0, workdir=staging)
    b.catalog.save(staging / "catalog.parquet")
    np.save(staging / "item_embeddings.npy", b.item_embeddings)
    b.index.save(staging)
    save_params(b.tower, staging / "user_tower.npz")
    b.ranker.save(staging / "ranker")
    b.history.save(staging / "history.parquet")
    b.item_stats.save(staging / "item_stats.npz")
    b.cooccurrence.save(staging / "cooccurrence.npz")
    make_tiny_bert(staging / "encoder", hidden=dim, layers=1, heads=4)
    manifest = {"config": to_dict(b.config), "data_end_ts": b.data_end_ts, "item_count": n_items}
    version = bundle_mod.publish(
        staging, root, {**manifest, "feature_names": list(FEATURE_NAMES), "metrics": {}}
    )
    return root / version


def measure(args: argparse.Namespace, bundle_dir: Path) -> int:
    root = bundle_dir.parent
    if bundle_mod.current_version(root) != bundle_dir.name:
        print(
            f"bench_batch: error: {bundle_dir.name} is not CURRENT in {root}; the server serves CURRENT",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    bundle = bundle_mod.load(bundle_dir)
    recommender = Recommender(bundle)
    recommender.warm()
    n_items = len(bundle.catalog.item_ids)
    log.info("bundle %s: %d items, loaded in %.1fs", bundle.version, n_items, time.perf_counter() - t0)
    if n_items < 100_000:
        log.warning("bundle has %d items (< 100k): figures are not the 100k-item benchmark", n_items)

    known = sorted(bundle.history.users())
    rng = random.Random(args.seed)
    users = rng.sample(known, min(args.users, len(known)))
    grpc_users = users[: args.grpc_users]
    batch_workers = sorted({1, args.workers})
    load_start = os.getloadavg()

    # In-process per-user loop: separates what batching buys from what gRPC costs. Single-threaded
    # maths like the server (ServeConfig.compute_threads = 1) and the batch.
    t1, c1 = time.perf_counter(), time.process_time()
    with thread_budget():
        for user in grpc_users:
            recommender.recommend(RecommendRequest(user_id=user, k=args.k))
    loop = Phase(
        "recommend() loop, in-process",
        len(grpc_users),
        time.perf_counter() - t1,
        time.process_time() - c1,
        os.getloadavg()[0],
    )

    rounds: list[list[Phase]] = []
    mismatches: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        server = ServerProcess(root, work, args.server_workers, args.server_processes)
        try:
            server.wait_until_serving(timeout=600.0)
            with RecsvcClient(server.target, timeout=10.0) as probe:
                for user in grpc_users[:20]:  # warm the server path
                    probe.recommend(user, args.k)
            for r in range(args.rounds):
                phases = []
                for workers in batch_workers:
                    out = work / f"candidates-{r}-{workers}.parquet"
                    phases.append(batch_phase(recommender, users, out, args, workers))
                seq, seq_answers = grpc_phase(server, grpc_users, args.k, 1)
                phases.append(seq)
                for concurrency in args.concurrency:
                    conc, answers = grpc_phase(server, grpc_users, args.k, concurrency)
                    phases.append(conc)
                    mismatches |= {u for u in grpc_users if answers.get(u) != seq_answers.get(u)}
                rounds.append(phases)
                log.info(
                    "round %d: %s", r + 1, ", ".join(f"{p.name} {p.users_per_s:.0f}/s" for p in rounds[-1])
                )
        finally:
            server.stop()
        batch = pl.read_parquet(work / f"candidates-{args.rounds - 1}-{args.workers}.parquet")
        one_process = pl.read_parquet(work / f"candidates-{args.rounds - 1}-1.parquet")
    batch_lists = {
        u: items
        for u, items in batch.sort(["user_id", "rank"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"))
        .iter_rows()
    }
    mismatches |= {u for u in grpc_users if seq_answers.get(u) != batch_lists.get(u, [])}
    workers_equal = batch.equals(one_process)
    return report(args, bundle_dir, n_items, loop, rounds, load_start, mismatches, workers_equal)


def _pooled(phases: list[Phase]) -> Phase:
    """All rounds of one phase as one run: total users / total seconds (and CPU)."""
    cpu = [p.cpu_seconds for p in phases]
    return Phase(
        phases[0].name,
        sum(p.users for p in phases),
        sum(p.seconds for p in phases),
        sum(c for c in cpu if c is not None) if all(c is not None for c in cpu) else None,
        max(p.load for p in phases),
    )


def report(
    args: argparse.Namespace,
    bundle_dir: Path,
    n_items: int,
    loop: Phase,
    rounds: list[list[Phase]],
    load_start: tuple[float, float, float],
    mismatches: set[str],
    workers_equal: bool,
) -> int:
    """Print the table and the issue's ratios; write the JSON."""
    n_batch = len(rounds[0]) - 1 - len(args.concurrency)  # batch phases first, then the gRPC ones

    def ratio(phases: list[Phase]) -> float:
        return phases[n_batch - 1].users_per_s / max(p.users_per_s for p in phases[n_batch:])

    def cpu_ratio(phases: list[Phase]) -> float | None:
        batch_cpu = phases[n_batch - 1].users_per_cpu_s
        grpc_cpu = [p.users_per_cpu_s for p in phases[n_batch:]]
        if batch_cpu is None or None in grpc_cpu:
            return None
        return batch_cpu / max(c for c in grpc_cpu if c is not None)

    pooled = [_pooled([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    per_round = [ratio(r) for r in rounds]
    pooled_ratio = ratio(pooled)
    pooled_cpu_ratio = cpu_ratio(pooled)
    print(
        f"\nbatch vs per-user gRPC Recommend: {n_items} items, k={args.k}, {os.cpu_count()} CPU(s) "
        f"({usable_cores()} usable), chunk {args.chunk_size}, {args.rounds} interleaved round(s)"
    )
    print(f"  load average at start: {' '.join(f'{x:.2f}' for x in load_start)}")
    print(f"  {'phase':32s} {'users':>6s} {'users/s':>9s} {'users/CPU-s':>12s} {'load':>5s}")
    for phase in [loop, *pooled]:
        cpu = phase.users_per_cpu_s
        print(
            f"  {phase.name:32s} {phase.users:6d} {phase.users_per_s:9.1f} "
            f"{(f'{cpu:.1f}' if cpu else '-'):>12s} {phase.load:5.2f}"
        )
    verdict = "meets" if pooled_ratio >= TARGET_RATIO else "MISSES"
    print(
        f"  ratio batch x{args.workers} / best gRPC = {pooled_ratio:.2f}x pooled "
        f"(rounds: {', '.join(f'{r:.2f}x' for r in per_round)}; median {statistics.median(per_round):.2f}x) "
        f"-> {verdict} the {TARGET_RATIO:g}x target"
    )
    if pooled_cpu_ratio is not None:
        print(
            f"  per CPU-second: batch x{args.workers} / best gRPC (server CPU only) = {pooled_cpu_ratio:.2f}x"
        )
    batch_pooled = pooled[n_batch - 1]
    by_mode = {p.name: batch_pooled.users_per_s / p.users_per_s for p in pooled[n_batch:]}
    print(
        f"  batch x{args.workers} / each gRPC mode: "
        + ", ".join(f"{name} {r:.2f}x" for name, r in by_mode.items())
    )
    print(f"  batch answers equal gRPC answers for all {args.grpc_users} users: {not mismatches}")
    print(f"  x{args.workers} processes output equals x1 process output: {workers_equal}")
    result = {
        "bundle": str(bundle_dir),
        "items": n_items,
        "k": args.k,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "batch_workers": args.workers,
        "batch_chunk_size": args.chunk_size,
        "grpc_concurrency": [1, *args.concurrency],
        "rounds": args.rounds,
        "load_average_start": list(load_start),
        "inprocess_loop": loop.row(),
        "pooled": [p.row() for p in pooled],
        "per_round": [[p.row() for p in r] for r in rounds],
        "ratio_batch_vs_best_grpc": round(pooled_ratio, 2),
        "ratio_per_round": [round(r, 2) for r in per_round],
        "ratio_per_grpc_mode": {name: round(r, 2) for name, r in by_mode.items()},
        "ratio_per_cpu_second": round(pooled_cpu_ratio, 2) if pooled_cpu_ratio is not None else None,
        "target_ratio": TARGET_RATIO,
        "answers_equal": not mismatches,
        "mismatched_users": len(mismatches),
        "workers_output_equal": workers_equal,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"  wrote {args.out}")
    return 0 if not mismatches and workers_equal else 1


if __name__ == "__main__":
    sys.exit(main())
