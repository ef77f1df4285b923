from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsvc import bundle
from recsvc.config import DAY, TrainConfig
from tests.helpers.tiny_bert import tiny_bert_dir_fixture  # noqa: F401  (pytest fixture)
from training import pipeline
from training.pipeline import PipelineError

# ----------------------------------------------------------------------------- pure parts


def test_windows_step_back_valid_days_from_the_test_cutoff() -> None:
    w = pipeline.compute_windows(0, 10 * DAY, 9 * DAY, valid_days=2)
    assert (w.T, w.T1, w.T2) == (9 * DAY, 7 * DAY, 5 * DAY)
    assert w.evaluate


def test_production_windows_end_just_after_the_last_event() -> None:
    w = pipeline.compute_windows(0, 10 * DAY, None, valid_days=1)
    assert w.T == 10 * DAY + 1
    assert w.T1 == w.T - DAY and w.T2 == w.T - 2 * DAY
    assert not w.evaluate


def test_windows_refuse_data_too_short_for_the_ranker_windows() -> None:
    with pytest.raises(PipelineError, match=r"spans 2\.00 days.*valid_days=1"):
        pipeline.compute_windows(0, 2 * DAY, DAY + DAY // 2, valid_days=1)


def _items(n: int) -> pl.DataFrame:
    return pl.DataFrame({"item_id": [f"i{j}" for j in range(n)], "title": [f"t{j}" for j in range(n)]})


def test_select_catalogue_without_cap_keeps_everything() -> None:
    items = _items(5)
    history = pl.DataFrame({"item_id": ["i1"], "timestamp": [1]})
    assert pipeline.select_catalogue(items, history, None, 0).equals(items)
    assert pipeline.select_catalogue(items, history, 5, 0).equals(items)


def test_select_catalogue_keeps_the_most_recently_active_items_in_catalogue_order() -> None:
    items = _items(6)
    # i5: bought twice today; i1: once today; i2: three times ten days ago.
    history = pl.DataFrame(
        {
            "item_id": ["i2", "i2", "i2", "i1", "i5", "i5"],
            "timestamp": [0, 0, 0, 10 * DAY, 10 * DAY, 10 * DAY],
        }
    )
    kept = pipeline.select_catalogue(items, history, 2, seed=0, half_life_days=2.0)
    assert kept["item_id"].to_list() == ["i1", "i5"]


def test_select_catalogue_fills_the_cap_with_never_seen_items() -> None:
    items = _items(10)
    history = pl.DataFrame({"item_id": ["i3"], "timestamp": [5]})
    kept = pipeline.select_catalogue(items, history, 4, seed=1)["item_id"].to_list()
    assert len(kept) == 4 and "i3" in kept
    assert kept == sorted(kept, key=lambda s: int(s[1:]))
    assert kept == pipeline.select_catalogue(items, history, 4, seed=1)["item_id"].to_list()


def test_cpu_budget_caps_steps_catalogue_tokens_and_eval_users() -> None:
    cfg = TrainConfig()
    budget = pipeline.plan_budget(cfg, "cpu")
    p = cfg.pipeline
    assert budget.max_catalogue_items == p.cpu_max_catalogue_items
    assert budget.max_finetune_steps == p.cpu_max_finetune_steps
    assert budget.max_tokens == min(cfg.text.max_tokens, p.cpu_max_tokens)
    assert budget.finetune_validation == p.cpu_finetune_validation
    run_cfg = pipeline.budgeted_config(cfg, budget)
    assert run_cfg.encoder.max_steps == p.cpu_max_finetune_steps
    assert budget.finetune_trainable_layers == run_cfg.encoder.trainable_layers == p.cpu_trainable_layers
    assert run_cfg.eval.max_users == p.cpu_eval_max_users
    assert run_cfg.ranker.max_train_users == min(cfg.ranker.max_train_users, p.cpu_ranker_max_train_users)
    assert run_cfg.ranker.search_trials == min(cfg.ranker.search_trials, p.cpu_ranker_search_trials)


def test_default_cpu_budget_serves_a_catalogue_the_size_of_hm() -> None:
    cap = pipeline.plan_budget(TrainConfig(), "cpu").max_catalogue_items
    assert cap is None or cap >= 110_000  # H&M has 105,542 items: the CPU run must not cap it


def test_cuda_budget_applies_only_the_general_caps() -> None:
    cfg = replace(TrainConfig(), pipeline=replace(TrainConfig().pipeline, max_catalogue_items=123))
    budget = pipeline.plan_budget(cfg, "cuda")
    assert budget.max_catalogue_items == 123
    assert budget.max_finetune_steps is None
    assert budget.finetune_trainable_layers is None  # every layer trains on a GPU
    assert budget.max_tokens == cfg.text.max_tokens
    assert budget.eval_max_users is None
    assert budget.finetune_validation
    assert budget.ranker_max_train_users == cfg.ranker.max_train_users


def test_changing_a_ranker_setting_invalidates_only_the_ranker_and_later_stages() -> None:
    cfg = TrainConfig()
    before = pipeline.stage_fingerprints(cfg, "data", True, {})
    after = pipeline.stage_fingerprints(
        replace(cfg, ranker=replace(cfg.ranker, num_leaves=31)), "data", True, {}
    )
    changed = {s for s in pipeline.STAGES if before[s] != after[s]}
    assert changed == {"ranker", "evaluate", "publish"}


def test_changing_only_the_ranker_budget_keeps_the_encoder_stages_cached() -> None:
    cfg = TrainConfig()
    more = replace(cfg, pipeline=replace(cfg.pipeline, cpu_ranker_max_train_users=9_999))
    fps = [
        pipeline.run_fingerprints(pipeline.budgeted_config(c, pipeline.plan_budget(c, "cpu")),
                                  pipeline.plan_budget(c, "cpu"), "data", True)
        for c in (cfg, more)
    ]  # fmt: skip
    changed = {s for s in pipeline.STAGES if fps[0][s] != fps[1][s]}
    assert changed == {"ranker", "evaluate", "publish"}


def test_changing_the_catalogue_budget_invalidates_the_split_and_everything_after() -> None:
    cfg = TrainConfig()
    fewer = replace(cfg, pipeline=replace(cfg.pipeline, cpu_max_catalogue_items=100))
    fps = [
        pipeline.run_fingerprints(pipeline.budgeted_config(c, pipeline.plan_budget(c, "cpu")),
                                  pipeline.plan_budget(c, "cpu"), "data", True)
        for c in (cfg, fewer)
    ]  # fmt: skip
    assert {s for s in pipeline.STAGES if fps[0][s] == fps[1][s]} == {"load"}


def test_changing_the_data_invalidates_every_stage() -> None:
    cfg = TrainConfig()
    a = pipeline.stage_fingerprints(cfg, "data-1", True, {})
    b = pipeline.stage_fingerprints(cfg, "data-2", True, {})
    assert all(a[s] != b[s] for s in pipeline.STAGES)


def test_measure_records_wall_time_cpu_time_and_peak_memory() -> None:
    timings: dict[str, dict[str, float]] = {}
    with pipeline.measure("demo", timings):
        block = np.ones(5_000_000, dtype=np.float64)  # 40 MB, touched
        block.sum()
    assert timings["demo"]["wall_s"] >= 0
    assert timings["demo"]["cpu_s"] >= 0
    assert timings["demo"]["peak_rss_mb"] >= 40


def test_a_stage_without_its_cached_inputs_names_what_to_run_first(tmp_path: Path) -> None:
    work = pipeline.WorkDir(tmp_path / "work")
    with pytest.raises(
        PipelineError, match=r"stage 'ranker' needs the outputs of stage 'index'.*--stage index"
    ):
        work.require("index", "ranker")


def test_run_training_rejects_unknown_stage_names(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="unknown stage"):
        pipeline.run_training(tmp_path, tmp_path / "b", stages=["bake"], work_dir=tmp_path / "w")


# ----------------------------------------------------------------------------- end to end


def tiny_config(model_dir: Path) -> TrainConfig:
    """Small enough for seconds on a CPU; every stage still runs its real code."""
    cfg = TrainConfig()
    return replace(
        cfg,
        encoder=replace(
            cfg.encoder,
            model_dir=str(model_dir),
            max_steps=3,
            batch_size=16,
            eval_every=2,
            tower_refit_steps=5,
            valid_max_users=50,
            max_train_pairs=400,
            embed_batch_size=64,
            precision="fp32",
        ),
        index=replace(cfg.index, recall_sample_users=50),
        candidates=replace(cfg.candidates, ann=50, max_candidates=120),
        ranker=replace(
            cfg.ranker, num_boost_round=15, search_trials=1, max_train_users=150, min_data_in_leaf=5
        ),
        baselines=replace(cfg.baselines, als_iterations=2, als_factors=8),
        eval=replace(cfg.eval, tune=False, max_users=80),
        pipeline=replace(cfg.pipeline, cpu_max_catalogue_items=None, cpu_trainable_layers=1),
    )


@pytest.fixture(scope="module", autouse=True)
def _embedding_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The raw-encoder embedding cache (training.text_baseline) goes to tmp, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSVC_CACHE_DIR", str(tmp_path_factory.mktemp("embedding_cache")))
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_dataset: Path, tiny_bert_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    work = root / "work"
    result = pipeline.run_training(
        synth_dataset,
        root / "bundles",
        tiny_config(tiny_bert_dir),
        work_dir=work,
        progress=False,
        device="cpu",
    )
    return {
        "result": result,
        "root": root / "bundles",
        "work": work,
        "data": synth_dataset,
        "bert": tiny_bert_dir,
    }


@pytest.mark.slow
def test_training_publishes_a_verified_bundle_pointed_at_by_current(trained: dict) -> None:
    result = trained["result"]
    assert result.version is not None
    assert bundle.current_version(trained["root"]) == result.version
    manifest = bundle.verify(trained["root"] / result.version)
    for part in (
        "encoder/config.json",
        "user_tower.npz",
        "item_embeddings.npy",
        "index.faiss",
        "catalog.parquet",
        "history.parquet",
        "item_stats.npz",
        "cooccurrence.npz",
        "metrics.json",
        "report/report.md",
    ):
        assert part in manifest["files"], part
    assert manifest["item_count"] == 200
    assert set(manifest["timings"]) == set(pipeline.STAGES) - {"publish"}
    assert 0.0 <= manifest["index"]["measured_ann_recall"] <= 1.0


@pytest.mark.slow
def test_the_published_bundle_loads_and_its_recommender_answers(trained: dict) -> None:
    from recsvc.recommender import Recommender, RecommendRequest

    loaded = bundle.load(trained["root"])
    rec = Recommender(loaded)
    user = loaded.history.users()[0]
    answer = rec.recommend(RecommendRequest(user_id=user, k=5))
    assert len(answer.items) == 5
    assert answer.model_version == trained["result"].version
    assert loaded.data_end_ts == loaded.manifest["windows"]["T"]


@pytest.mark.slow
def test_evaluation_compares_every_baseline_and_the_pipeline_in_both_modes(trained: dict) -> None:
    evaluation = trained["result"].metrics["evaluation"]
    systems = {
        "popularity",
        "repeat_pop",
        "itemknn",
        "als",
        "raw_encoder",
        "finetuned_encoder",
        "full_pipeline",
    }
    for mode in ("all", "novel"):
        assert set(evaluation["final"][mode]) == systems
        for values in evaluation["final"][mode].values():
            assert 0.0 <= values["ndcg@12"] <= 1.0
    assert set(evaluation["retrieval"]) == {"raw_encoder", "finetuned_encoder"}
    assert "recall@100" in evaluation["retrieval"]["raw_encoder"]
    assert "full_pipeline" in evaluation["cold_start"]


@pytest.mark.slow
def test_embed_reuses_the_finetune_raw_pass_and_fills_the_raw_embedding_cache(trained: dict) -> None:
    from training.text_baseline import cached_catalogue_embeddings, catalogue_cache_file

    work = trained["work"]
    raw = np.load(work / "finetune" / "raw_item_embeddings.npy")
    np.testing.assert_array_equal(np.load(work / "embed" / "raw_item_embeddings.npy"), raw)
    summary = json.loads((work / "finetune" / "summary.json").read_text())
    assert summary["trainable_layers"] == 1 and summary["state_cache_gb"] > 0
    cfg = pipeline.budgeted_config(
        tiny_config(trained["bert"]), pipeline.plan_budget(tiny_config(trained["bert"]), "cpu")
    )
    served = pl.read_parquet(work / "split" / "served_items.parquet")
    assert catalogue_cache_file(trained["bert"], served, cfg.text, summary["raw_precision"]).is_file()
    fresh = cached_catalogue_embeddings(
        trained["bert"], served, cfg.text, batch_size=cfg.encoder.embed_batch_size, precision="fp32",
        cache_dir=Path(trained["root"]) / "fresh-cache", progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(fresh, raw)  # computed anew: the same vectors bit for bit


@pytest.mark.slow
def test_rerun_with_the_same_work_dir_reuses_every_cached_stage(trained: dict, tmp_path: Path) -> None:
    again = pipeline.run_training(
        trained["data"],
        tmp_path / "b",
        tiny_config(trained["bert"]),
        work_dir=trained["work"],
        progress=False,
        device="cpu",
    )
    cached = {s for s, t in again.timings.items() if t.get("cached")}
    assert cached == set(pipeline.STAGES) - {"publish"} or cached == set(pipeline.STAGES)


@pytest.mark.slow
def test_a_single_stage_reruns_from_cached_inputs(trained: dict) -> None:
    cfg = tiny_config(trained["bert"])
    cfg = replace(cfg, ranker=replace(cfg.ranker, num_boost_round=5))
    result = pipeline.run_training(
        trained["data"],
        trained["root"],
        cfg,
        stages=["ranker"],
        work_dir=trained["work"],
        progress=False,
        device="cpu",
    )
    assert set(result.timings) == {"ranker"} and result.version is None
    meta = json.loads((trained["work"] / "ranker" / "stage.json").read_text())
    budget = pipeline.plan_budget(cfg, "cpu")
    expected = pipeline.run_fingerprints(
        pipeline.budgeted_config(cfg, budget), budget, pipeline.data_fingerprint(trained["data"]), True
    )
    assert meta["fingerprint"] == expected["ranker"]


@pytest.mark.slow
def test_production_mode_trains_on_all_data_without_evaluation(
    synth_dataset: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    result = pipeline.run_training(
        synth_dataset,
        tmp_path / "bundles",
        tiny_config(tiny_bert_dir),
        evaluate=False,
        progress=False,
        device="cpu",
    )
    manifest = bundle.verify(result.bundle_path)
    interactions = pl.read_parquet(synth_dataset / "interactions.parquet")
    assert manifest["windows"]["T"] > interactions["timestamp"].max()
    assert "evaluation" not in manifest["metrics"]
    assert not [p for p in (tmp_path / "bundles").iterdir() if p.name.startswith(".staging-")]


def test_tiny_production_run_publishes_a_bundle_whose_recommender_answers(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The fast variant of the end-to-end run: small shop, no evaluation stage."""
    from recsvc.recommender import Recommender, RecommendRequest
    from training.synth import write_dataset

    data = write_dataset(tmp_path / "data", n_users=80, n_items=60, n_interactions=1_500, days=6, seed=3)
    cfg = tiny_config(tiny_bert_dir)
    cfg = replace(
        cfg,
        encoder=replace(cfg.encoder, max_steps=1, tower_refit_steps=2),
        ranker=replace(cfg.ranker, num_boost_round=5, max_train_users=60, num_threads=1),
    )
    result = pipeline.run_training(
        data, tmp_path / "bundles", cfg, evaluate=False, progress=False, device="cpu"
    )
    loaded = bundle.load(tmp_path / "bundles")
    assert loaded.version == result.version
    user = loaded.history.users()[0]
    answer = Recommender(loaded).recommend(RecommendRequest(user_id=user, k=3))
    assert len(answer.items) == 3
    assert all(item.item_id in loaded.catalog.index for item in answer.items)


# ----------------------------------------------------------------------------- evaluation adapters


@pytest.mark.slow  # building a real bundle (ranking sets + LightGBM) took ~30 s on the loaded 2-core host
def test_recommender_system_returns_the_request_path_answers_as_a_candidate_frame(
    synth_loaded, tmp_path: Path
) -> None:
    from recsvc.recommender import Recommender, RecommendRequest
    from tests.helpers.bundle_builder import build_loaded_bundle

    loaded = build_loaded_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path)
    loaded.ranker.disable_fast_path()  # stock LightGBM: same answers, no native compile in a unit test
    rec = Recommender(loaded)
    system = pipeline.RecommenderSystem(rec, batch_size=7)
    users = [*loaded.history.users()[:10], "never-seen-user"]
    frame = system.recommend(users, k=5, exclude_seen=True)
    assert frame.columns == ["user_id", "item_id", "rank", "score", "sources"]
    assert frame["user_id"].unique().len() == len(users)
    for user in (users[0], users[-1]):
        direct = rec.recommend(RecommendRequest(user_id=user, k=5, repeat_policy="exclude"))
        rows = frame.filter(pl.col("user_id") == user).sort("rank")
        assert rows["item_id"].to_list() == [i.item_id for i in direct.items]
        assert rows["rank"].to_list() == list(range(1, len(direct.items) + 1))
    seen = {loaded.catalog.item_ids[i] for i in loaded.history.get(users[0]).items}
    assert not seen & set(frame.filter(pl.col("user_id") == users[0])["item_id"].to_list())


def test_summarise_evaluation_reshapes_the_table_by_mode_and_system(synth_loaded) -> None:
    from training.baselines import make_baseline
    from training.evaluate import evaluate_systems
    from training.split import holdout_cutoff, time_split

    split = time_split(synth_loaded.interactions, holdout_cutoff(synth_loaded.interactions, 1))
    systems = [make_baseline("popularity"), make_baseline("repeat_pop")]
    table = evaluate_systems(systems, split.train, split.test, synth_loaded.items, ks=(12, 50, 100))
    summary = pipeline.summarise_evaluation(table, (12, 50, 100))
    for result in table.results:
        for mode, entry in result["modes"].items():
            assert summary["final"][mode][result["system"]]["ndcg@12"] == entry["metrics"]["ndcg@12"]
        assert summary["cold_start"][result["system"]] == result["modes"]["all"]["metrics"]["cold_recall@100"]
    assert summary["retrieval"] == {}  # no encoder system was evaluated
