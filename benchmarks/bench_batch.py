"""Batch candidate generation throughput vs per-user gRPC `Recommend`, same bundle, same run.

Why: `recsvc-batch` exists because calling the online service once per user is too slow for
nightly candidate sets. This measures both paths on the same trained bundle (H&M: 105k items):

1. `recsvc.batch.run_batch` (chunked `recommend_many`) over `--users` bundle users -> users/s;
2. the real `recsvc-serve` in a child process on loopback, driven by the real client calling
   `Recommend` once per user, sequentially and with `--concurrency` threads -> users/s;
3. ratio batch / best gRPC (target >= 5x), and an equality check: the batch item lists must equal
   the server's for every user called over gRPC.

The bundle comes from `benchmarks/bench_pipeline.py` (bench-out/pipeline/bundles) or `--bundle`.
Without one, a synthetic bundle of `--synthetic-items` (default 100k) items is published to a
temporary bundles root: REAL parts (FAISS HNSW index, production-sized LightGBM ranker, histories,
stats, co-occurrence; built by bench_serve.synthetic_bundle) over random 384-d item embeddings,
so the throughput figures hold at 100k items even before a model is trained. Numbers depend on
the machine and its other users.

    .venv/bin/python benchmarks/bench_batch.py [--bundle DIR] [--users 5000] [--grpc-users 500]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from recsvc import bundle as bundle_mod  # noqa: E402
from recsvc.batch import run_batch  # noqa: E402
from recsvc.client import RecsvcClient  # noqa: E402
from recsvc.config import to_dict  # noqa: E402
from recsvc.recommender import Recommender, RecommendRequest  # noqa: E402

DEFAULT_BUNDLE = REPO / "bench-out" / "pipeline" / "bundles"
TARGET_RATIO = 5.0
log = logging.getLogger("bench_batch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m recsvc.server` on loopback in a child process (its own GIL and CPU share)."""

    def __init__(self, bundles_root: Path, workdir: Path, workers: int) -> None:
        self.port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "recsvc.server",
            "--bundles",
            str(bundles_root),
            "--port",
            str(self.port),
        ]
        cmd += [
            "--metrics-port",
            "0",
            "--events-db",
            str(workdir / "events.sqlite"),
            "--workers",
            str(workers),
        ]
        cmd += ["--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, cwd=REPO)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def grpc_per_user(
    target: str, users: list[str], k: int, concurrency: int
) -> tuple[float, dict[str, list[str]]]:
    """Seconds to call Recommend once per user with `concurrency` client threads, and the answers."""
    answers: dict[str, list[str]] = {}
    clients = [RecsvcClient(target, timeout=30.0) for _ in range(concurrency)]

    def work(i: int) -> None:
        client = clients[i]
        for user in users[i::concurrency]:
            answers[user] = [it.item_id for it in client.recommend(user, k).items]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(work, range(concurrency)))
    seconds = time.perf_counter() - start
    for c in clients:
        c.close()
    return seconds, answers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundles root or folder (default: %(default)s)"
    )
    p.add_argument("--users", type=int, default=5_000, help="users in the batch run (default: %(default)s)")
    p.add_argument(
        "--grpc-users", type=int, default=500, help="users called over gRPC (default: %(default)s)"
    )
    p.add_argument("--k", type=int, default=100, help="candidates per user (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=1_024, help="batch chunk size (default: %(default)s)")
    p.add_argument(
        "--workers", type=int, default=2, help="batch worker threads and server workers (default: 2)"
    )
    p.add_argument("--concurrency", type=int, default=4, help="client threads in the concurrent gRPC run")
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

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        summary = run_batch(
            recommender,
            users,
            work / "candidates.parquet",
            k=args.k,
            chunk_size=args.chunk_size,
            workers=args.workers,
        )
        batch = pl.read_parquet(work / "candidates.parquet")
        batch_lists = {
            u: items
            for u, items in batch.sort(["user_id", "rank"])
            .group_by("user_id", maintain_order=True)
            .agg(pl.col("item_id"))
            .iter_rows()
        }
        # In-process per-user loop: separates what batching buys from what gRPC costs.
        t1 = time.perf_counter()
        for user in grpc_users:
            recommender.recommend(RecommendRequest(user_id=user, k=args.k))
        loop_users_per_s = len(grpc_users) / (time.perf_counter() - t1)
        del recommender, bundle  # the server child needs the memory more than we do now

        server = ServerProcess(root, work, args.workers)
        try:
            with RecsvcClient(server.target, timeout=10.0) as probe:
                probe.wait_until_serving(timeout=600.0)
                probe.recommend(grpc_users[0], args.k)  # warm the server path
            seq_s, seq_answers = grpc_per_user(server.target, grpc_users, args.k, 1)
            conc_s, conc_answers = grpc_per_user(server.target, grpc_users, args.k, args.concurrency)
        finally:
            server.stop()

    mismatches = [u for u in grpc_users if seq_answers.get(u) != batch_lists.get(u, [])]
    mismatches += [u for u in grpc_users if conc_answers.get(u) != seq_answers.get(u)]
    grpc_seq = len(grpc_users) / seq_s
    grpc_conc = len(grpc_users) / conc_s
    best_grpc = max(grpc_seq, grpc_conc)
    ratio = summary.users_per_s / best_grpc
    result = {
        "bundle": str(bundle_dir),
        "items": n_items,
        "k": args.k,
        "cpu_count": os.cpu_count(),
        "batch_users": summary.users,
        "batch_workers": args.workers,
        "batch_chunk_size": args.chunk_size,
        "batch_seconds": round(summary.seconds, 2),
        "batch_users_per_s": round(summary.users_per_s, 1),
        "inprocess_recommend_users_per_s": round(loop_users_per_s, 1),
        "grpc_users": len(grpc_users),
        "grpc_sequential_users_per_s": round(grpc_seq, 1),
        "grpc_concurrent_users_per_s": round(grpc_conc, 1),
        "grpc_concurrency": args.concurrency,
        "ratio_batch_vs_best_grpc": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "answers_equal": not mismatches,
        "mismatched_users": len(set(mismatches)),
    }
    print(f"\nbatch vs per-user gRPC Recommend, {n_items} items, k={args.k}, {os.cpu_count()} CPU(s)")
    print(f"  recsvc-batch     {summary.users:6d} users  {summary.users_per_s:9.1f} users/s")
    print(
        f"  recommend() loop {len(grpc_users):6d} users  {loop_users_per_s:9.1f} users/s  (in-process, no gRPC)"
    )
    print(f"  gRPC sequential  {len(grpc_users):6d} users  {grpc_seq:9.1f} users/s")
    print(f"  gRPC x{args.concurrency:<2d}        {len(grpc_users):6d} users  {grpc_conc:9.1f} users/s")
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"  ratio batch / best gRPC = {ratio:.2f}x ({verdict} the {TARGET_RATIO:g}x target)")
    print(f"  batch answers equal gRPC answers for all {len(grpc_users)} users: {not mismatches}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"  wrote {args.out}")
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
