from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsvc import bundle as bundle_mod
from recsvc.batch import (
    CANDIDATE_SCHEMA,
    BatchError,
    Shard,
    build_parser,
    in_shard,
    main,
    parse_shard,
    parts_dir,
    read_users,
    results_rows,
    run_batch,
)
from recsvc.candidates import BITS_BY_NAMES
from recsvc.compute_threads import usable_cores
from recsvc.recommender import (
    RankedColumns,
    RankingPolicy,
    Recommender,
    RecommendRequest,
    RecommendResult,
    ScoredItem,
)
from tests.helpers.bundle_builder import write_bundle

K = 8


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def bundles_root(synth_loaded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def recommender(bundles_root: Path) -> Recommender:
    """The published bundle through the real loader, exactly what the gRPC server serves."""
    return Recommender(bundle_mod.load(bundles_root))


@pytest.fixture(scope="module")
def users(recommender: Recommender) -> list[str]:
    known = sorted(recommender.bundle.history.users())[:60]
    return [*known, "never-seen-user-1", "never-seen-user-2"]


@pytest.fixture(scope="module")
def full_output(
    recommender: Recommender, users: list[str], tmp_path_factory: pytest.TempPathFactory
) -> pl.DataFrame:
    out = tmp_path_factory.mktemp("full") / "c.parquet"
    run_batch(recommender, users, out, k=K, chunk_size=7, progress=False)
    return pl.read_parquet(out)


def _interrupt_after(n: int, recommender: Recommender, users: list[str], out: Path, **options) -> list[int]:
    """run_batch stopped by an exception from on_chunk_done at the n-th finished chunk; the chunk
    indices reported before the stop, in order."""
    done: list[int] = []

    def stop_after_n(index: int) -> None:
        done.append(index)
        if len(done) == n:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_batch(recommender, users, out, k=K, progress=False, on_chunk_done=stop_after_n, **options)
    return done


def _online(recommender: Recommender, user: str) -> list[tuple[str, float, str]]:
    res = recommender.recommend(RecommendRequest(user_id=user, k=K))
    return [(it.item_id, float(np.float32(it.score)), ",".join(it.sources)) for it in res.items]


def _rows(frame: pl.DataFrame, user: str) -> list[tuple[str, float, str]]:
    part = frame.filter(pl.col("user_id") == user).sort("rank")
    return [(i, float(s), src) for i, s, src in part.select("item_id", "score", "sources").iter_rows()]


def test_output_has_the_candidate_schema_and_ranks_from_one(
    full_output: pl.DataFrame, users: list[str]
) -> None:
    assert dict(full_output.schema) == CANDIDATE_SCHEMA
    assert full_output["user_id"].n_unique() == len(users)
    ranks = full_output.group_by("user_id").agg(pl.col("rank").sort())
    assert all(r == list(range(1, len(r) + 1)) for r in ranks["rank"].to_list())
    assert full_output.select(pl.struct("user_id", "item_id").is_unique().all()).item()


def test_batch_equals_online_recommend_for_sampled_users(
    full_output: pl.DataFrame, recommender: Recommender, users: list[str]
) -> None:
    for user in [*users[::9], users[-1]]:
        assert _rows(full_output, user) == _online(recommender, user)


def test_unknown_users_get_the_non_personalised_answer(
    recommender: Recommender, full_output: pl.DataFrame
) -> None:
    res = recommender.recommend(RecommendRequest(user_id="never-seen-user-1", k=K))
    assert not res.personalised
    rows = _rows(full_output, "never-seen-user-1")
    assert len(rows) == K
    assert rows == _rows(full_output, "never-seen-user-2")


def test_batch_equals_the_real_grpc_server(
    bundles_root: Path, full_output: pl.DataFrame, users, tmp_path: Path
) -> None:
    from tests.helpers.running_server import RunningServer, serve_config

    with RunningServer(serve_config(bundles_root, tmp_path)) as server, server.client() as client:
        client.wait_until_serving()
        for user in [*users[::12], users[-1]]:
            resp = client.recommend(user, K)
            online = [(it.item_id, float(np.float32(it.score))) for it in resp.items]
            assert [(i, s) for i, s, _ in _rows(full_output, user)] == online


def test_repeat_policy_exclude_never_returns_owned_items(
    recommender: Recommender, users, tmp_path: Path
) -> None:
    out = tmp_path / "c.parquet"
    run_batch(recommender, users[:20], out, k=K, repeat_policy="exclude", progress=False)
    frame = pl.read_parquet(out)
    catalog_ids = recommender.catalog.item_ids
    for user in users[:20]:
        owned = {str(catalog_ids[i]) for i in recommender.bundle.history.get(user).items}
        assert not owned & set(frame.filter(pl.col("user_id") == user)["item_id"].to_list())


def test_policy_without_ranker_matches_online_with_that_policy(
    recommender: Recommender, users, tmp_path: Path
) -> None:
    policy = RankingPolicy(use_ranker=False)
    out = tmp_path / "c.parquet"
    run_batch(recommender, users[:10], out, k=K, policy=policy, progress=False)
    frame = pl.read_parquet(out)
    for user in users[:10:3]:
        res = recommender.recommend(RecommendRequest(user_id=user, k=K), policy)
        assert frame.filter(pl.col("user_id") == user).sort("rank")["item_id"].to_list() == [
            it.item_id for it in res.items
        ]


def test_interrupted_job_resumes_without_recomputing_or_duplicating(
    recommender: Recommender, users: list[str], full_output: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "c.parquet"
    _interrupt_after(3, recommender, users, out, chunk_size=7)
    assert not out.exists()
    finished = sorted(p.name for p in parts_dir(out).glob("part-*.parquet"))
    assert finished == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]

    resumed: list[int] = []
    summary = run_batch(
        recommender, users, out, k=K, chunk_size=7, progress=False, on_chunk_done=resumed.append
    )
    assert resumed == list(range(3, 9))  # 62 users / 7 per chunk = 9 chunks, 3 reused
    assert (summary.chunks_reused, summary.chunks_computed) == (3, 6)
    assert pl.read_parquet(out).equals(full_output)
    assert not parts_dir(out).exists()


def test_resume_with_different_options_is_refused(recommender: Recommender, users, tmp_path: Path) -> None:
    out = tmp_path / "c.parquet"
    _interrupt_after(1, recommender, users, out, chunk_size=7)
    with pytest.raises(BatchError, match=r"different options \(k\)"):
        run_batch(recommender, users, out, k=K + 1, chunk_size=7, progress=False)


def test_two_worker_processes_give_exactly_the_one_process_output(
    recommender: Recommender, users, full_output: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "c.parquet"
    summary = run_batch(recommender, users, out, k=K, chunk_size=7, workers=2, progress=False)
    assert pl.read_parquet(out).equals(full_output)
    assert (summary.chunks_computed, summary.chunks_reused) == (9, 0)


def test_worker_processes_run_in_other_processes(recommender: Recommender, users, tmp_path: Path) -> None:
    seen_children: list[int] = []
    run_batch(
        recommender,
        users,
        tmp_path / "c.parquet",
        k=K,
        chunk_size=7,
        workers=2,
        progress=False,
        on_chunk_done=lambda _: seen_children.extend(p.pid for p in multiprocessing.active_children()),
    )
    assert len(set(seen_children)) == 2
    assert os.getpid() not in seen_children


def test_job_interrupted_with_worker_processes_resumes_to_the_same_output(
    recommender: Recommender, users: list[str], full_output: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "c.parquet"
    done = _interrupt_after(2, recommender, users, out, chunk_size=7, workers=2)
    assert not out.exists()
    on_disk = {int(p.stem.split("-")[1]) for p in parts_dir(out).glob("part-*.parquet")}
    assert on_disk == set(done)  # the parent writes a part before reporting it, nothing more

    resumed: list[int] = []
    summary = run_batch(
        recommender, users, out, k=K, chunk_size=7, workers=2, progress=False, on_chunk_done=resumed.append
    )
    assert sorted(resumed) == sorted(set(range(9)) - on_disk)
    assert (summary.chunks_reused, summary.chunks_computed) == (2, 7)
    assert pl.read_parquet(out).equals(full_output)


def test_killed_worker_processes_fail_the_job_and_a_rerun_finishes_it(
    recommender: Recommender, users: list[str], full_output: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "c.parquet"

    def kill_the_workers(index: int) -> None:
        # Every worker: with one killed, the other could finish the remaining chunks while the
        # pool's manager thread, busy relaying its results, had not yet looked at the dead one
        # (then the job succeeds, correctly, and nothing is asserted; seen once in ~13 suite runs).
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)

    with pytest.raises(BatchError, match="worker process died"):
        run_batch(
            recommender,
            users,
            out,
            k=K,
            chunk_size=7,
            workers=2,
            progress=False,
            on_chunk_done=kill_the_workers,
        )
    kept = len(list(parts_dir(out).glob("part-*.parquet")))
    assert 1 <= kept < 9
    summary = run_batch(recommender, users, out, k=K, chunk_size=7, workers=2, progress=False)
    assert summary.chunks_reused == kept
    assert pl.read_parquet(out).equals(full_output)


def test_shards_partition_the_users_exactly_once() -> None:
    users = [f"user-{i}" for i in range(5000)]
    shards = [in_shard(users, Shard(i, 4)) for i in range(4)]
    flat = [u for s in shards for u in s]
    assert sorted(flat) == sorted(users)
    assert len(flat) == len(set(flat))
    assert all(900 < len(s) < 1600 for s in shards)
    assert in_shard(users, Shard(2, 4)) == shards[2]  # stable


@pytest.mark.parametrize(
    ("n_shards", "workers", "chunk_size"),
    [(3, 1, 7), (2, 2, 4)],
    ids=["3 shards in one process", "2 shards x 2 worker processes"],
)
def test_sharded_outputs_cover_each_user_once_and_together_equal_the_full_output(
    recommender: Recommender, users, full_output: pl.DataFrame, tmp_path: Path, n_shards, workers, chunk_size
) -> None:
    frames = []
    for i in range(n_shards):
        out = tmp_path / f"c-{i}.parquet"
        run_batch(
            recommender,
            users,
            out,
            k=K,
            chunk_size=chunk_size,
            shard=Shard(i, n_shards),
            workers=workers,
            progress=False,
        )
        frames.append(pl.read_parquet(out))
    per_shard_users = [set(f["user_id"].unique().to_list()) for f in frames]
    assert sum(map(len, per_shard_users)) == len(set().union(*per_shard_users))  # pairwise disjoint
    assert set().union(*per_shard_users) == set(users)
    combined = pl.concat(frames).sort(["user_id", "rank"])
    assert combined.equals(full_output.sort(["user_id", "rank"]))


@pytest.mark.parametrize("spec", ["3", "a/b", "4/4", "-1/2", "1/0"])
def test_bad_shard_spec_is_rejected(spec: str) -> None:
    with pytest.raises(BatchError, match="shard"):
        parse_shard(spec)


def test_users_file_without_user_id_column_is_rejected_naming_it(tmp_path: Path) -> None:
    pl.DataFrame({"customer": ["a"]}).write_parquet(tmp_path / "u.parquet")
    with pytest.raises(BatchError, match=r"u\.parquet has no user_id column"):
        read_users(tmp_path / "u.parquet")


def test_users_file_duplicates_are_dropped_in_order(tmp_path: Path) -> None:
    (tmp_path / "u.csv").write_text("user_id\n007\nb\n007\n")
    assert read_users(tmp_path / "u.csv") == ["007", "b"]


def test_cli_writes_candidates_for_a_users_file_and_a_variant(
    bundles_root: Path, users, tmp_path: Path, capsys
) -> None:
    pl.DataFrame({"user_id": users[:15]}).write_parquet(tmp_path / "u.parquet")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "experiments:\n  - name: e\n    salt: s\n    variants:\n"
        "      - {name: control, share: 0.5, policy: {use_ranker: false}}\n"
        "      - {name: treatment, share: 0.5}\n"
    )
    out = tmp_path / "c.parquet"
    args = [
        "--bundle",
        str(bundles_root),
        "--users",
        str(tmp_path / "u.parquet"),
        "--k",
        "5",
        "--out",
        str(out),
    ]
    assert main([*args, "--variant", "control", "--experiments", str(exp), "--no-progress"]) == 0
    frame = pl.read_parquet(out)
    assert frame["user_id"].n_unique() == 15 and frame["rank"].max() == 5
    assert "15 users" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shard", "5/2"], "--shard 5/2"),
        (["--variant", "control"], "--variant and --experiments go together"),
        (["--k", "0"], "--k must be >= 1"),
    ],
)
def test_cli_bad_options_exit_2_with_a_message(
    bundles_root: Path, tmp_path: Path, capsys, extra, message
) -> None:
    args = [
        "--bundle",
        str(bundles_root),
        "--all-users",
        "--out",
        str(tmp_path / "c.parquet"),
        "--no-progress",
    ]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_bundle_and_users_file_exit_2_naming_them(bundles_root: Path, tmp_path: Path, capsys) -> None:
    out = ["--out", str(tmp_path / "c.parquet")]
    assert main(["--bundle", str(tmp_path / "nowhere"), "--all-users", *out]) == 2
    assert "nowhere" in capsys.readouterr().err
    pl.DataFrame({"uid": ["a"]}).write_parquet(tmp_path / "u.parquet")
    assert main(["--bundle", str(bundles_root), "--users", str(tmp_path / "u.parquet"), *out]) == 2
    assert "no user_id column" in capsys.readouterr().err


def _ranked(rows: list[int], scores: list[float], sources: list[tuple[str, ...]]) -> RecommendResult:
    """A result as `recommend_many` makes it: columns with catalogue rows (ids "i<row>")."""
    columns = RankedColumns(
        np.asarray([f"i{r}" for r in rows], dtype=object),
        np.asarray(scores, dtype=np.float64),
        np.asarray([BITS_BY_NAMES[s] for s in sources], dtype=np.uint8),
        None,
        np.asarray(rows, dtype=np.int32),
    )
    return RecommendResult(None, "v", [], True, {}, columns=columns)


def test_results_frame_ranks_each_users_items_from_one_and_joins_sources() -> None:
    catalogue = pl.Series("item_id", ["i0", "i1", "i2"])
    results = [
        _ranked([0, 1], [1.0, 0.5], [("ann", "cooc"), ()]),
        _ranked([], [], []),
        _ranked([2], [2.0], [("popular",)]),
    ]
    frame = results_rows(["u1", "u2", "u3"], results).frame(catalogue)
    assert frame.rows() == [
        ("u1", "i0", 1, 1.0, "ann,cooc"),
        ("u1", "i1", 2, 0.5, ""),
        ("u3", "i2", 1, 2.0, "popular"),
    ]
    assert results_rows(["u2"], [results[1]]).frame(catalogue).height == 0


def test_recommender_results_travel_as_catalogue_rows_and_frame_like_their_items(
    recommender: Recommender, users: list[str]
) -> None:
    results = recommender.recommend_many([RecommendRequest(user_id=u, k=K) for u in users[:5]])
    rows = results_rows(users[:5], results)
    assert rows.items.dtype == np.int32  # no strings pickled per chunk
    frame = rows.frame(recommender.catalog.id_series())
    expected = [
        (u, it.item_id, rank, np.float32(it.score), ",".join(it.sources))
        for u, r in zip(users[:5], results)
        for rank, it in enumerate(r.items, start=1)
    ]
    assert frame.rows() == expected


def test_results_without_catalogue_rows_are_refused() -> None:
    by_ids = RecommendResult([ScoredItem("a", 1.0, ("ann",))], "v", [], True, {})
    with pytest.raises(ValueError, match="catalogue rows"):
        results_rows(["u1"], [by_ids])


def test_thread_budget_makes_blas_and_faiss_single_threaded_and_restores_them() -> None:
    import faiss
    from threadpoolctl import threadpool_info

    from recsvc.batch import thread_budget

    faiss.omp_set_num_threads(2)
    before = faiss.omp_get_max_threads()
    with thread_budget():
        assert faiss.omp_get_max_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert faiss.omp_get_max_threads() == before


def test_usable_cores_counts_at_least_one_and_at_most_the_cpus_this_process_may_use() -> None:
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_cli_default_workers_is_the_usable_core_count() -> None:
    args = build_parser().parse_args(["--bundle", "b", "--all-users", "--out", "o.parquet"])
    assert args.workers == usable_cores()


def test_cli_refuses_an_out_path_that_is_the_users_file(bundles_root: Path, tmp_path: Path, capsys) -> None:
    users_file = tmp_path / "users.csv"
    users_file.write_text("user_id\na\nb\n")
    code = main(["--bundle", str(bundles_root), "--users", str(users_file), "--out", str(users_file)])
    assert code == 2
    assert "--out" in capsys.readouterr().err
    assert users_file.read_text() == "user_id\na\nb\n"  # the input is untouched


def test_cli_bad_k_is_refused_before_the_bundle_is_loaded(tmp_path: Path, capsys) -> None:
    # No bundle exists at all: the number is the first thing wrong, so it is what the user hears.
    code = main(
        [
            "--bundle",
            str(tmp_path / "nowhere"),
            "--all-users",
            "--k",
            "0",
            "--out",
            str(tmp_path / "c.parquet"),
        ]
    )
    assert code == 2
    assert "--k must be >= 1" in capsys.readouterr().err


def test_cli_warns_how_many_users_the_bundle_does_not_know(
    bundles_root: Path, users, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pl.DataFrame({"user_id": [users[0], "typo-1", "typo-2"]}).write_parquet(tmp_path / "u.parquet")
    args = [
        "--bundle",
        str(bundles_root),
        "--users",
        str(tmp_path / "u.parquet"),
        "--k",
        "3",
        "--no-progress",
    ]
    with caplog.at_level("WARNING", logger="recsvc.batch"):
        assert main([*args, "--out", str(tmp_path / "c.parquet"), "--workers", "1"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("2 of 3 users" in w and "typo-1" in w and "non-personalised" in w for w in warnings)


@pytest.mark.parametrize("who", ["--users", "--all-users"])
def test_cli_says_once_that_k_is_capped_by_the_catalogue(
    who: str, bundles_root: Path, users, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pl.DataFrame({"user_id": users[:2]}).write_parquet(tmp_path / "u.parquet")
    selection = ["--users", str(tmp_path / "u.parquet")] if who == "--users" else ["--all-users"]
    args = ["--bundle", str(bundles_root), *selection, "--k", "100000", "--no-progress", "--workers", "1"]
    with caplog.at_level("INFO", logger="recsvc.batch"):
        assert main([*args, "--out", str(tmp_path / "c.parquet")]) == 0
    capped = [r.getMessage() for r in caplog.records if "catalogue items" in r.getMessage()]
    assert len(capped) == 1 and capped[0].startswith("--k 100000 is more than the")


def test_cli_warns_when_the_users_file_is_empty(bundles_root: Path, tmp_path: Path, caplog) -> None:
    pl.DataFrame({"user_id": []}, schema={"user_id": pl.Utf8}).write_parquet(tmp_path / "u.parquet")
    args = ["--bundle", str(bundles_root), "--users", str(tmp_path / "u.parquet"), "--no-progress"]
    with caplog.at_level("WARNING", logger="recsvc.batch"):
        assert main([*args, "--out", str(tmp_path / "c.parquet"), "--workers", "1"]) == 0
    assert any("no user ids" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_cli_experiments_file_errors_name_experiments_not_variant(
    bundles_root: Path, tmp_path: Path, capsys
) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("experiments: [unclosed\n")
    args = ["--bundle", str(bundles_root), "--all-users", "--out", str(tmp_path / "c.parquet")]
    assert main([*args, "--experiments", str(exp), "--variant", "control"]) == 2
    assert "error: --experiments: " in capsys.readouterr().err
    exp.write_text(
        "experiments:\n  - name: e\n    salt: s\n    variants:\n      - {name: control, share: 1.0}\n"
    )
    assert main([*args, "--experiments", str(exp), "--variant", "contrl"]) == 2
    assert "error: --variant: unknown variant 'contrl'" in capsys.readouterr().err
