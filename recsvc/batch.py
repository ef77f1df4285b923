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
- one machine: `--workers N` (default: the CPUs this process may use) forks N worker processes
  after the bundle is loaded, so they share its memory copy-on-write and each has its own GIL.
  Workers take whole chunks from one queue and send their rows back; the parent writes the same
  numbered parts a single process would, so the output is identical for any N and a job killed
  with one N resumes with another. Workers run single-threaded BLAS and FAISS and never touch
  polars (forked OpenMP and polars thread pools hang; parallelism comes from the processes).
  `--chunk-size` bounds each worker's memory; throughput is flat from 128 to 4096 users per
  chunk on the 100k-item benchmark bundle. Shards and workers compose: a shard's chunks are split
  among that job's workers.
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
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from tqdm import tqdm

from recsvc.candidates import NAMES_BY_BITS
from recsvc.compute_threads import limit_compute_threads, usable_cores
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
# The `sources` column's text for every source bitmask ("ann,cooc"), so a chunk is one gather.
_SOURCE_NAMES = pl.Series([",".join(names) for names in NAMES_BY_BITS], dtype=pl.Utf8)


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


@dataclass(frozen=True)
class ChunkRows:
    """One chunk's candidate rows as numpy columns: what a worker process sends back.

    Why numpy, and catalogue rows instead of item ids: polars' thread pools hang in a forked
    child, so workers only rank and the parent builds the frame and writes the part. Sent as
    ~100 Python strings per user, the ids cost the workers a pickle and the parent an unpickle
    and a conversion to Arrow, together more than writing the part (256 users: 2.5 ms in the
    worker, 4 ms in the parent); as int32 rows they are a gather from the catalogue's ids.
    """

    user_ids: list[str]
    counts: np.ndarray  # int64, rows per user, in user order
    items: np.ndarray  # int32 catalogue rows
    scores: np.ndarray  # float32
    source_bits: np.ndarray  # uint8, SOURCE_BITS of each row

    def frame(self, catalogue_ids: pl.Series) -> pl.DataFrame:
        """The candidate frame (CANDIDATE_SCHEMA), rank 1 = best within each user;
        `catalogue_ids` is `Catalog.id_series()`."""
        starts = np.cumsum(self.counts) - self.counts
        user_rows = np.repeat(np.arange(len(self.user_ids)), self.counts)
        return pl.DataFrame(
            {
                "user_id": pl.Series(self.user_ids, dtype=pl.Utf8).gather(user_rows),
                "item_id": catalogue_ids.gather(self.items),
                "rank": np.arange(len(self.items), dtype=np.int32) - np.repeat(starts, self.counts) + 1,
                "score": self.scores,
                "sources": _SOURCE_NAMES.gather(self.source_bits),
            },
            schema=CANDIDATE_SCHEMA,
        )


def results_rows(user_ids: Sequence[str], results: Sequence[RecommendResult]) -> ChunkRows:
    """`Recommender.recommend_many` results -> columns, concatenating each result's `RankedColumns`.

    Column by column, never an object per row: ~100 rows per user made object-by-object work a
    tenth of the batch's time.
    """
    columns = [r.columns for r in results]
    rows = [c.items for c in columns if c.items is not None]
    if len(rows) != len(columns):
        raise ValueError("every result must carry its catalogue rows (RankedColumns.items)")
    return ChunkRows(
        list(user_ids),
        np.fromiter((len(c) for c in columns), dtype=np.int64, count=len(columns)),
        np.concatenate([np.zeros(0, np.int32), *rows]).astype(np.int32, copy=False),
        np.concatenate([np.zeros(0), *(c.scores for c in columns)]).astype(np.float32),
        np.concatenate([np.zeros(0, np.uint8), *(c.source_bits for c in columns)]),
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


def check_options(*, k: int, chunk_size: int, workers: int) -> None:
    """The numeric options, checked before a bundle is loaded (seconds) so a typo fails at once."""
    if k < 1:
        raise BatchError(f"--k must be >= 1, got {k}")
    if chunk_size < 1:
        raise BatchError(f"--chunk-size must be >= 1, got {chunk_size}")
    if workers < 1:
        raise BatchError(f"--workers must be >= 1, got {workers}")


def check_out_path(out: str | Path, users_file: str | Path | None) -> None:
    """Refuse an --out that is the --users file: the job would overwrite its own input."""
    if users_file is not None and Path(out).resolve() == Path(users_file).resolve():
        raise BatchError(f"--out {out} is the --users file; write the candidates to another file")


def warn_about_users(users: Sequence[str], known: Callable[[str], bool], k: int, item_count: int) -> None:
    """Say what a user would otherwise only find out from the output: ids the bundle has never
    seen (wrong id format, typos) get the non-personalised answer, and k is capped by the catalogue."""
    if not users:
        log.warning("no user ids to rank: the output will have no rows")
        return
    unknown = [u for u in users if not known(u)]
    if unknown:
        examples = ", ".join(repr(u) for u in unknown[:5])
        log.warning(
            "%d of %d users have no history in the bundle and get the non-personalised answer "
            "(e.g. %s); check that the ids match the training data",
            len(unknown),
            len(users),
            examples,
        )
    if k > item_count:
        log.info(
            "--k %d is more than the %d catalogue items: each user gets at most %d", k, item_count, item_count
        )


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

    check_options(k=k, chunk_size=chunk_size, workers=workers)
    if repeat_policy not in REPEAT_POLICIES:
        raise BatchError(
            f"--repeat-policy must be one of {', '.join(REPEAT_POLICIES)}, got {repeat_policy!r}"
        )
    policy = policy or default_policy()
    out_path = Path(out)
    users = in_shard(user_ids, shard)
    warn_about_users(users, recommender.bundle.history.__contains__, k, len(recommender.bundle.catalog))
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
    processes = min(workers, len(todo))
    if processes > 1 and not forking_available():
        log.warning("--workers %d: this platform cannot fork; running in one process", workers)
        processes = 1
    log.info(
        "batch: %d users%s, k=%d, %d chunks of <= %d, %d worker process(es), bundle %s",
        len(users),
        f" (shard {shard})" if shard else "",
        k,
        len(chunks),
        chunk_size,
        max(processes, 1),
        recommender.model_version,
    )

    catalogue_ids = recommender.catalog.id_series()

    def rank_chunk(chunk: list[str]) -> ChunkRows:
        reqs = [RecommendRequest(user_id=u, k=k, repeat_policy=repeat_policy) for u in chunk]
        return results_rows(chunk, recommender.recommend_many(reqs, policy))

    with _chunk_runner(todo, rank_chunk, processes) as finished:
        bar = tqdm(
            total=len(users),
            initial=len(users) - sum(len(c) for _, c in todo),
            unit="user",
            desc="batch candidates",
            disable=not progress,
            smoothing=0.1,
        )
        try:
            for index, chunk_rows in finished:
                _write_part(chunk_rows.frame(catalogue_ids), _part_path(parts, index))
                bar.update(len(chunk_rows.user_ids))
                if on_chunk_done:
                    on_chunk_done(index)
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


def forking_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


RankChunk = Callable[[list[str]], ChunkRows]


@contextmanager
def _chunk_runner(
    todo: list[tuple[int, list[str]]], rank_chunk: RankChunk, processes: int
) -> Iterator[Iterator[tuple[int, ChunkRows]]]:
    """(chunk index, rows) for each finished chunk, ranked here or by `processes` forked workers.

    Leaving the block early (an error, Ctrl-C, a callback that raises) terminates the workers at
    once; parts already written stay and are reused on resume.
    """
    if processes <= 1:
        with thread_budget():
            yield ((index, rank_chunk(chunk)) for index, chunk in todo)
        return
    executor = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_start_worker,
        initargs=(rank_chunk, os.getpid()),
    )
    try:
        yield _completed(executor, todo, processes)
    except BaseException:
        # shutdown() alone would let each worker finish its chunk first (seconds each)
        processes_left = list(getattr(executor, "_processes", {}).values())
        for process in processes_left:
            process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes_left:  # gone before the caller retries or forks again
            process.join(timeout=30)
        raise
    executor.shutdown(wait=True)


def _completed(
    executor: ProcessPoolExecutor, todo: list[tuple[int, list[str]]], processes: int
) -> Iterator[tuple[int, ChunkRows]]:
    """Results as chunks finish, with at most 2 x processes chunks handed out at a time, so a
    job over millions of users does not pickle every chunk's user list into the queue up front."""
    pending = iter(todo)
    running: set[Future[tuple[int, ChunkRows]]] = set()

    def submit_next() -> None:
        item = next(pending, None)
        if item is not None:
            running.add(executor.submit(_run_chunk, item))

    # A dead worker breaks the pool: the next result() or submit() (whichever comes first) raises.
    try:
        for _ in range(2 * processes):
            submit_next()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.remove(future)
                result = future.result()
                submit_next()
                yield result
    except BrokenProcessPool as exc:
        raise BatchError(
            "a worker process died (killed, or out of memory?); the chunks already written "
            "are kept: re-run the same command to resume"
        ) from exc


# Set in each forked worker by _start_worker: the chunk function (inherited, never pickled).
_worker_rank_chunk: RankChunk | None = None


def _start_worker(rank_chunk: RankChunk, parent_pid: int) -> None:
    """Runs first in each forked worker: single-threaded maths, die with the parent, no Ctrl-C.

    - OpenMP and BLAS at one thread: a forked child that starts an OpenMP parallel region the
      parent's (now missing) thread pool served hangs, and N workers x N threads oversubscribe.
    - A killed parent must not leave workers computing for nobody (Linux: PR_SET_PDEATHSIG).
    - Ctrl-C reaches the whole process group; the parent alone handles it and terminates us.
    """
    global _worker_rank_chunk
    _worker_rank_chunk = rank_chunk
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    limit_compute_threads(1)


def _run_chunk(item: tuple[int, list[str]]) -> tuple[int, ChunkRows]:
    assert _worker_rank_chunk is not None, "_run_chunk runs only in a worker set up by _start_worker"
    index, chunk = item
    return index, _worker_rank_chunk(chunk)


@contextmanager
def thread_budget() -> Iterator[None]:
    """Single-threaded BLAS and FAISS OpenMP while a batch runs in this process; the previous
    limits are restored afterwards. Parallelism comes from worker processes instead.

    Why: the request path's matrix products are small, and with faiss's OpenMP runtime loaded a
    multi-threaded OpenBLAS call hands work between busy threads (ms instead of µs). FAISS itself
    with 2 OpenMP threads on 2 cores shared with other jobs ran recommend_many at half the
    users per CPU-second of 1 thread (103 vs 190) and lower wall-clock throughput (73-96 vs
    135-180 users/s, same run, load 4.7): idle OpenMP threads spin.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(previous)


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
        "--workers",
        type=int,
        default=usable_cores(),
        help="worker processes, forked after the bundle is loaded, each computing whole chunks "
        "(default: the CPUs this process may use, here %(default)s); the output does not depend on it",
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
    recommender.warm(query_encoder=False)  # batch requests carry no free-text query
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
        check_options(k=args.k, chunk_size=args.chunk_size, workers=args.workers)
        check_out_path(args.out, args.users)
        shard = parse_shard(args.shard) if args.shard else None
        policy, version = default_policy(), None
        if args.variant is not None:
            try:
                router = ExperimentRouter.from_file(args.experiments)
            except ExperimentConfigError as exc:
                raise BatchError(f"--experiments: {exc}") from None
            try:
                assignment = router.assign("", forced_variant=args.variant)
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
