from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recsvc.catalog import Catalog
from recsvc.config import DAY, TrainConfig
from tests.helpers.bundle_builder import (
    EMBED_DIM,
    build_index,
    category_embeddings,
    ranker_on_window,
    untrained_tower,
)
from training.baselines import PopularityBaseline
from training.evaluate import EvaluationTable
from training.valid_compare import compare_on_validation, main, ratio_lines, validation_bundle


@pytest.fixture(scope="module")
def setup(synth_loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    inter, items = synth_loaded.interactions, synth_loaded.items
    cfg = TrainConfig()
    t_end = int(inter["timestamp"].max()) + 1
    t1, t2 = t_end - 2 * DAY, t_end - 4 * DAY
    catalog = Catalog.from_items(items, cfg.text.attribute_columns)
    emb = category_embeddings(items)
    index = build_index(emb, cfg)
    tower = untrained_tower(EMBED_DIM, cfg.encoder.history_len)
    ranker = ranker_on_window(
        inter, cutoff=t2, label_end=t1, catalog=catalog, item_emb=emb, index=index, tower=tower, config=cfg
    )
    parts = dict(
        catalog=catalog,
        item_emb=emb,
        index=index,
        tower=tower,
        ranker=ranker,
        novel_ranker=None,
        config=cfg,
        encoder_dir=tmp_path_factory.mktemp("valid") / "encoder",
    )
    return {"inter": inter, "items": items, "t1": t1, "t_end": t_end, "parts": parts}


def test_validation_bundle_serves_state_from_before_t1_only(setup: dict[str, Any]) -> None:
    inter, t1 = setup["inter"], setup["t1"]
    bundle = validation_bundle(inter, t1=t1, **setup["parts"])
    before_only = validation_bundle(inter.filter(pl.col("timestamp") < t1), t1=t1, **setup["parts"])
    assert bundle.data_end_ts == t1
    assert all(int(bundle.history.get(u).timestamps.max()) < t1 for u in bundle.history.users())
    np.testing.assert_array_equal(bundle.item_stats.popularity, before_only.item_stats.popularity)
    assert bundle.cf is not None and before_only.cf is not None
    np.testing.assert_array_equal(bundle.cf.item_factors, before_only.cf.item_factors)


def test_compare_on_validation_scores_every_system_on_the_same_window_users(setup: dict[str, Any]) -> None:
    inter, t1, t_end = setup["inter"], setup["t1"], setup["t_end"]
    bundle = validation_bundle(inter, t1=t1, **setup["parts"])
    table = compare_on_validation(
        inter, setup["items"], t1=t1, t_end=t_end, bundle=bundle, baselines=[PopularityBaseline()], ks=(12,)
    )
    window_users = inter.filter(pl.col("timestamp") >= t1)["user_id"].n_unique()
    assert [r["system"] for r in table.results] == ["popularity", "full_pipeline"]
    for result in table.results:
        assert result["users"] == window_users
        assert result["modes"]["novel"]["users"] == table.results[0]["modes"]["novel"]["users"]
        assert 0.0 <= result["modes"]["novel"]["metrics"]["ndcg@12"] <= 1.0
    assert table.results[1]["modes"]["all"]["metrics"]["ndcg@12"] > 0


def test_compare_on_validation_refuses_state_from_another_cutoff(setup: dict[str, Any]) -> None:
    inter, t1, t_end = setup["inter"], setup["t1"], setup["t_end"]
    bundle = validation_bundle(inter, t1=t1 - DAY, **setup["parts"])
    with pytest.raises(ValueError, match="T1"):
        compare_on_validation(inter, setup["items"], t1=t1, t_end=t_end, bundle=bundle, baselines=[])


def _result(system: str, ndcg: float) -> dict[str, Any]:
    return {"system": system, "modes": {"novel": {"metrics": {"ndcg@12": ndcg}}}}


def test_ratio_lines_divide_by_the_best_other_system() -> None:
    table = EvaluationTable(
        results=[_result("als", 0.02), _result("popularity", 0.01), _result("full_pipeline", 0.03)],
        ks=(12,),
        modes=("novel",),
    )
    assert ratio_lines(table) == [
        "novel: full_pipeline ndcg@12 0.03000 vs best baseline als 0.02000 (x1.500)"
    ]


def test_cli_without_a_finished_run_exits_2_naming_the_missing_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--work-dir", str(tmp_path / "empty")]) == 2
    assert "stage 'load'" in capsys.readouterr().err


def test_cli_names_a_missing_later_stage_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.pipeline import WorkDir

    work = WorkDir(tmp_path / "work")
    for stage in ("load", "split", "state", "embed", "index"):
        work.begin(stage)
        work.finish(stage, "test", {})
    assert main(["--work-dir", str(tmp_path / "work")]) == 2
    assert "stage 'finetune'" in capsys.readouterr().err
