"""Offline candidate generation for many users (CLI `recsvc-batch`), same answers as online.

Uses the serving `Recommender.recommend_many` (one FAISS search and one ranker call per chunk), so
a user's batch candidates equal what `Recommend` returns for the same bundle and options. Output
is a candidate frame `user_id, item_id, rank (1 = best), score, sources`.

Streaming and resumable: each chunk of users is written as its own parquet part in
`<out>.parts/` (temp file + atomic rename), so a crash loses at most the chunks in flight and a
re-run with the same options skips parts already on disk. When every part exists they are
concatenated into `--out` (again via an atomic rename) and the parts folder is removed.
`<out>.parts/_job.json` records the options; re-running with different ones is refused.

Scaling out:
- one machine: `--workers N` runs N chunks concurrently in threads (FAISS, LightGBM and NumPy
  release the GIL); `--chunk-size` trades memory for batching efficiency.
- many machines or processes: run one job per shard with `--shard i/n` (i = 0..n-1) and its own
  `--out`; shards are a stable hash of user_id, so they partition the users exactly once and a
  failed shard can be re-run alone (it resumes from its parts). Concatenate the n outputs (or
  read them together, e.g. `polars.scan_parquet("candidates-*.parquet")`).
- every shard must read the same bundle: pass a bundle folder (not a root whose CURRENT may move).

    recsvc-batch --bundle bundles --all-users --k 100 --out candidates.parquet
    recsvc-batch --bundle bundles/20261123T101500Z --users users.parquet --shard 3/8 --out c-3.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from tqdm import tqdm

from recsvc.config import BatchConfig, ServeConfig
from recsvc.experiments import unit_hash

if TYPE_CHECKING:
    from recsvc.recommender import RankingPolicy, Recommender, RecommendResult

log = logging.getLogger(__name__)

SHARD_SALT = "recsvc-batch-shard"
JOB_FILE = "_job.json"
CANDIDATE_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Utf8(),
    "item_id": pl.Utf8(),
    "rank": pl.Int32(),
    "score": pl.Float32(),
    "sources": pl.Utf8(),
}


class BatchError(Exception):
    """The batch job cannot run as asked; the message names the flag, file or column."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str) -> Shard:
    """'i/n' with 0 <= i < n."""
    parts = spec.split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise BatchError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if count < 1 or not 0 <= index < count:
        raise BatchError(f"--shard {spec}: need n >= 1 and 0 <= i < n")
    return Shard(index, count)


def shard_of(user_id: str, count: int) -> int:
    """Stable shard number of a user (same in every process and machine)."""
    return min(int(unit_hash(SHARD_SALT, user_id) * count), count - 1)


def in_shard(user_ids: Sequence[str], shard: Shard | None) -> list[str]:
    if shard is None or shard.count == 1:
        return list(user_ids)
    return [u for u in user_ids if shard_of(u, shard.count) == shard.index]


def read_users(path: str | Path) -> list[str]:
    """Distinct user ids, in file order, from the `user_id` column of a parquet or CSV file."""
    p = Path(path)
    if not p.is_file():
        raise BatchError(f"users file not found: {p}")
    try:
        if p.suffix == ".csv":
            frame = pl.read_csv(p, schema_overrides={"user_id": pl.Utf8})
        else:
            frame = pl.read_parquet(p)
    except Exception as exc:
        raise BatchError(f"cannot read users file {p} (parquet, or .csv): {exc}") from None
    if "user_id" not in frame.columns:
        raise BatchError(f"users file {p} has no user_id column (columns: {', '.join(frame.columns)})")
    users = frame.get_column("user_id").cast(pl.Utf8)
    if users.null_count():
        raise BatchError(f"users file {p}: column user_id has {users.null_count()} empty value(s)")
    distinct = users.unique(maintain_order=True).to_list()
    if len(distinct) < len(users):
        log.info("users file %s: %d duplicate user id(s) dropped", p, len(users) - len(distinct))
    return distinct


def results_frame(user_ids: Sequence[str], results: Sequence[RecommendResult]) -> pl.DataFrame:
    """Recommender results -> candidate frame (CANDIDATE_SCHEMA).

    Built column by column (user ids and ranks by np.repeat, source names joined once
    per distinct source set), not row by row: ~100 rows per user made the Python loop a tenth of
    the batch's time.
    """
    counts = [len(r.items) for r in results]
    items = [item for r in results for item in r.items]
    joined: dict[tuple[str, ...], str] = {}
    return pl.DataFrame(
        {
            "user_id": np.repeat(np.asarray(list(user_ids), dtype=object), counts).tolist(),
            "item_id": [item.item_id for item in items],
            "rank": np.arange(len(items), dtype=np.int32) - np.repeat(np.cumsum(counts) - counts, counts) + 1,
            "score": [item.score for item in items],
            "sources": [
                joined.get(item.sources) or joined.setdefault(item.sources, ",".join(item.sources))
                for item in items
            ],
        },
        schema=CANDIDATE_SCHEMA,
    )


@dataclass(frozen=True)
class BatchJob:
    """Everything that decides the output; stored in `<out>.parts/_job.json` to make resume safe."""

    bundle_version: str
    k: int
    repeat_policy: str
    policy: dict
    shard: str | None
    chunk_size: int
    users_sha256: str
    n_users: int


def _users_digest(users: Sequence[str]) -> str:
    h = hashlib.sha256()
    for u in users:
        h.update(u.encode())
        h.update(b"\0")
    return h.hexdigest()


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _part_path(parts: Path, chunk: int) -> Path:
    return parts / f"part-{chunk:06d}.parquet"


def _prepare_parts(parts: Path, job: BatchJob) -> None:
    job_file = parts / JOB_FILE
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        if previous != asdict(job):
            changed = sorted(k for k in asdict(job) if previous.get(k) != asdict(job)[k])
            raise BatchError(
                f"{parts} holds parts of a job with different options ({', '.join(changed)}); "
                "delete that folder to start over, or re-run with the original options to resume"
            )
        return
    parts.mkdir(parents=True, exist_ok=True)
    tmp = job_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(job), indent=2))
    os.replace(tmp, job_file)


def _write_part(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)  # a part either exists complete or not at all


def _chunks(users: Sequence[str], size: int) -> Iterator[tuple[int, list[str]]]:
    for i, start in enumerate(range(0, len(users), size)):
        yield i, list(users[start : start + size])


@dataclass(frozen=True)
class BatchSummary:
    out: Path
    users: int
    rows: int
    chunks_computed: int
    chunks_reused: int
    seconds: float

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")


def run_batch(
    recommender: Recommender,
    user_ids: Sequence[str],
    out: str | Path,
    *,
    k: int = BatchConfig.k,
    repeat_policy: str = BatchConfig.repeat_policy,
    policy: RankingPolicy | None = None,
    shard: Shard | None = None,
    chunk_size: int = BatchConfig.chunk_size,
    workers: int = 1,
    progress: bool = True,
    on_chunk_done: Callable[[int], None] | None = None,
) -> BatchSummary:
    """Candidates for `user_ids` (restricted to `shard`) into `out`; resumes from `<out>.parts/`.

    `on_chunk_done(chunk_index)` runs after each part is safely on disk (progress hooks, tests).
    """
    from recsvc.recommender import REPEAT_POLICIES, RecommendRequest

    if k < 1:
        raise BatchError(f"--k must be >= 1, got {k}")
    if chunk_size < 1:
        raise BatchError(f"--chunk-size must be >= 1, got {chunk_size}")
    if workers < 1:
        raise BatchError(f"--workers must be >= 1, got {workers}")
    if repeat_policy not in REPEAT_POLICIES:
        raise BatchError(
            f"--repeat-policy must be one of {', '.join(REPEAT_POLICIES)}, got {repeat_policy!r}"
        )
    policy = policy or default_policy()
    out_path = Path(out)
    users = in_shard(user_ids, shard)
    job = BatchJob(
        bundle_version=recommender.model_version,
        k=k,
        repeat_policy=repeat_policy,
        policy=asdict(policy),
        shard=str(shard) if shard else None,
        chunk_size=chunk_size,
        users_sha256=_users_digest(users),
        n_users=len(users),
    )
    parts = parts_dir(out_path)
    _prepare_parts(parts, job)
    started = time.perf_counter()
    chunks = list(_chunks(users, chunk_size))
    todo = [(i, c) for i, c in chunks if not _part_path(parts, i).exists()]
    reused = len(chunks) - len(todo)
    if reused:
        log.info("resuming: %d of %d chunks already in %s", reused, len(chunks), parts)
    log.info(
        "batch: %d users%s, k=%d, %d chunks of <= %d, %d worker(s), bundle %s",
        len(users),
        f" (shard {shard})" if shard else "",
        k,
        len(chunks),
        chunk_size,
        workers,
        recommender.model_version,
    )

    def compute(index: int, chunk: list[str]) -> int:
        reqs = [RecommendRequest(user_id=u, k=k, repeat_policy=repeat_policy) for u in chunk]
        _write_part(results_frame(chunk, recommender.recommend_many(reqs, policy)), _part_path(parts, index))
        return len(chunk)

    bar = tqdm(
        total=len(users),
        initial=sum(len(c) for i, c in chunks if _part_path(parts, i).exists()),
        unit="user",
        desc="batch candidates",
        disable=not progress,
        smoothing=0.1,
    )
    try:
        with thread_budget(workers):
            if workers == 1:
                for index, chunk in todo:
                    bar.update(compute(index, chunk))
                    if on_chunk_done:
                        on_chunk_done(index)
            else:
                _run_parallel(todo, compute, workers, bar, on_chunk_done)
    finally:
        bar.close()
    rows = _concatenate(parts, len(chunks), out_path)
    shutil.rmtree(parts)
    elapsed = time.perf_counter() - started
    summary = BatchSummary(out_path, len(users), rows, len(todo), reused, elapsed)
    log.info(
        "wrote %d rows for %d users to %s in %.1fs (%.0f users/s; %d chunks computed, %d reused)",
        rows,
        len(users),
        out_path,
        elapsed,
        summary.users_per_s,
        len(todo),
        reused,
    )
    return summary


@contextmanager
def thread_budget(workers: int) -> Iterator[None]:
    """Single-threaded BLAS and cores / workers FAISS OpenMP threads while a batch runs.

    Why: the request path's matrix-vector products are small, and with faiss's OpenMP runtime
    loaded a multi-threaded OpenBLAS call hands work between busy threads (ms instead of µs); with
    N workers, N FAISS searches each wanting every core oversubscribe the machine. Parallelism
    comes from the workers. Previous limits are restored afterwards.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(previous)


def _run_parallel(
    todo: list[tuple[int, list[str]]],
    compute: Callable[[int, list[str]], int],
    workers: int,
    bar: tqdm,
    on_chunk_done: Callable[[int], None] | None,
) -> None:
    """At most 2 x workers chunks in flight so memory stays bounded; first error stops the job."""
    pending = iter(todo)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recsvc-batch") as pool:
        running: dict[Future[int], int] = {}

        def submit_next() -> None:
            item = next(pending, None)
            if item is not None:
                running[pool.submit(compute, *item)] = item[0]

        for _ in range(2 * workers):
            submit_next()
        while running:
            done, _ = wait(running, return_when=FIRST_EXCEPTION)
            for fut in done:
                index = running.pop(fut)
                try:
                    bar.update(fut.result())
                    if on_chunk_done:
                        on_chunk_done(index)
                except BaseException:
                    for other in running:
                        other.cancel()
                    raise
                submit_next()


def _concatenate(parts: Path, n_chunks: int, out: Path) -> int:
    files = [_part_path(parts, i) for i in range(n_chunks)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise BatchError(f"cannot finish {out}: part(s) missing from {parts}: {', '.join(missing[:5])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if files:
        pl.scan_parquet([str(f) for f in files]).sink_parquet(tmp)
    else:
        pl.DataFrame(schema=CANDIDATE_SCHEMA).write_parquet(tmp)
    os.replace(tmp, out)
    return pl.scan_parquet(out).select(pl.len()).collect().item()


def default_policy() -> RankingPolicy:
    """The policy the server uses for users outside every experiment (ServeConfig defaults)."""
    from recsvc.recommender import RankingPolicy

    serve = ServeConfig()
    return RankingPolicy(
        max_per_category=serve.max_per_category, diversity_attribute=serve.diversity_attribute
    )


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    d = BatchConfig()
    p = argparse.ArgumentParser(
        prog="recsvc-batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--bundle", required=True, help="a bundle folder, or a bundles root (its CURRENT bundle is used)"
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", help="parquet or CSV file with a user_id column (duplicates are dropped)")
    who.add_argument("--all-users", action="store_true", help="every user with history in the bundle")
    p.add_argument("--k", type=int, default=d.k, help="candidates per user (default: %(default)s)")
    p.add_argument("--out", required=True, help="output parquet file (parts are staged in <out>.parts/)")
    p.add_argument(
        "--repeat-policy",
        choices=("allow", "exclude"),
        default=d.repeat_policy,
        help="allow: items the user already has may be recommended again; exclude: never (default: %(default)s)",
    )
    p.add_argument("--variant", help="use this experiment variant's ranking policy (needs --experiments)")
    p.add_argument("--experiments", help="experiments YAML file that defines --variant")
    p.add_argument("--shard", help="i/n: only users whose stable hash falls in shard i of n (0-based)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=d.chunk_size,
        help="users per recommend_many call and per output part (default: %(default)s)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="chunks computed concurrently in threads (default: 1)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still say what happened)"
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _load_recommender(bundle_arg: str, bundle_version: str | None) -> Recommender:
    from recsvc import bundle as bundle_mod
    from recsvc.recommender import Recommender

    path = bundle_mod.resolve(bundle_arg)
    if bundle_version is not None and path.name != bundle_version:
        root = Path(bundle_arg)
        if (root / bundle_version).is_dir():
            path = root / bundle_version
        else:
            raise BatchError(
                f"the variant serves bundle {bundle_version}, but --bundle {bundle_arg} is {path.name}; "
                "pass the bundles root that holds it"
            )
    recommender = Recommender(bundle_mod.load(path))
    recommender.warm()
    return recommender


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from recsvc.bundle import BundleError
    from recsvc.experiments import ExperimentConfigError, ExperimentRouter

    try:
        if (args.variant is None) != (args.experiments is None):
            raise BatchError("--variant and --experiments go together (the variant is looked up in the file)")
        shard = parse_shard(args.shard) if args.shard else None
        policy, version = default_policy(), None
        if args.variant is not None:
            try:
                assignment = ExperimentRouter.from_file(args.experiments).assign(
                    "", forced_variant=args.variant
                )
            except ValueError as exc:
                raise BatchError(f"--variant: {exc}") from None
            policy, version = assignment.policy, assignment.bundle_version
            log.info("variant %s/%s: %s", assignment.experiment, assignment.variant, policy)
        users = read_users(args.users) if args.users else None
        recommender = _load_recommender(args.bundle, version)
        if users is None:
            users = sorted(recommender.bundle.history.users())
        summary = run_batch(
            recommender,
            users,
            args.out,
            k=args.k,
            repeat_policy=args.repeat_policy,
            policy=policy,
            shard=shard,
            chunk_size=args.chunk_size,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (BatchError, BundleError, ExperimentConfigError) as exc:
        print(f"recsvc-batch: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary.users} users -> {summary.rows} rows in {summary.out} "
        f"({summary.seconds:.1f}s, {summary.users_per_s:.0f} users/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
