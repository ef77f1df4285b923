from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from recsvc.ab_report import VariantResult
from recsvc.exposures import ExposureLog
from training.baselines import ItemKNN, PopularityBaseline
from training.data import load_dataset
from training.simulate_ab import (
    SimulationConfig,
    baseline_variant,
    future_items,
    main,
    run_simulation,
)
from training.split import holdout_cutoff, time_split
from training.synth import write_dataset

# Big enough that a real quality gap is detectable in one replay, small enough to run in seconds.
SIZES = {"n_users": 10_000, "n_items": 400, "n_interactions": 120_000, "days": 14, "seed": 3}


@dataclass
class Replay:
    folder: Path
    test: pl.DataFrame
    items: pl.DataFrame
    cutoff: int
    popularity: PopularityBaseline
    itemknn: ItemKNN


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    folder = write_dataset(tmp_path_factory.mktemp("sim") / "data", **SIZES)
    data = load_dataset(folder)
    cutoff = holdout_cutoff(data.interactions, 1.0)
    split = time_split(data.interactions, cutoff)
    pop, knn = PopularityBaseline(), ItemKNN()
    pop.fit(split.train, data.items)
    knn.fit(split.train, data.items)
    return Replay(folder, split.test, data.items, cutoff, pop, knn)


def _by_variant(result) -> dict[str, VariantResult]:
    (exp,) = result.report.experiments
    return {v.variant: v for v in exp.variants}


def test_better_variant_comes_out_significantly_better(replay: Replay, tmp_path: Path) -> None:
    variants = {
        "popularity": baseline_variant(replay.popularity),
        "itemknn": baseline_variant(replay.itemknn),
    }
    result = run_simulation(replay.test, variants, tmp_path, ts=replay.cutoff, items=replay.items)
    treatment = _by_variant(result)["itemknn"]
    assert treatment.ctr_test.diff > 0
    assert treatment.ctr_test.p_value < 0.001
    assert treatment.conversion_test.p_value < 0.001
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.png").exists()


def test_aa_run_is_not_significant(replay: Replay, tmp_path: Path) -> None:
    same = baseline_variant(replay.popularity)
    result = run_simulation(
        replay.test, {"a": same, "b": same}, tmp_path, ts=replay.cutoff, items=replay.items
    )
    b = _by_variant(result)["b"]
    assert b.ctr_test.p_value > 0.05
    assert b.conversion_test.p_value > 0.05
    assert b.revenue_test.p_value > 0.05


def test_interleaving_prefers_the_better_variant_and_not_a_copy(replay: Replay, tmp_path: Path) -> None:
    cfg = SimulationConfig(interleave=True)
    variants = {
        "popularity": baseline_variant(replay.popularity),
        "itemknn": baseline_variant(replay.itemknn),
    }
    result = run_simulation(replay.test, variants, tmp_path / "ab", ts=replay.cutoff, cfg=cfg)
    (il,) = result.report.experiments[0].interleaving
    assert (il.team_a, il.team_b) == ("itemknn", "popularity")
    assert il.test.preference > 0 and il.test.p_value < 1e-6

    same = baseline_variant(replay.popularity)
    aa = run_simulation(replay.test, {"a": same, "b": same}, tmp_path / "aa", ts=replay.cutoff, cfg=cfg)
    (il_aa,) = aa.report.experiments[0].interleaving
    assert il_aa.test.p_value > 0.05


def test_every_held_out_user_gets_one_logged_exposure_of_k_items(replay: Replay, tmp_path: Path) -> None:
    cfg = SimulationConfig(k=5, max_users=300)
    same = baseline_variant(replay.popularity)
    result = run_simulation(replay.test, {"a": same, "b": same}, tmp_path, ts=replay.cutoff, cfg=cfg)
    exposures = ExposureLog(result.exposures_path).read()
    assert result.users == len(exposures) == 300
    assert all(len(e.items) == 5 and e.ts == replay.cutoff for e in exposures)
    assert len({e.user_key for e in exposures}) == 300
    events = pl.read_parquet(result.events_path)
    assert events.height > 0 and (events["timestamp"] > replay.cutoff).all()


def test_future_items_are_each_users_held_out_items() -> None:
    test = pl.DataFrame({"user_id": ["u", "u", "v"], "item_id": ["a", "b", "a"]})
    assert future_items(test) == {"u": {"a", "b"}, "v": {"a"}}


def test_simulation_needs_exactly_two_variants(replay: Replay, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly two variants"):
        run_simulation(replay.test, {"a": baseline_variant(replay.popularity)}, tmp_path, ts=replay.cutoff)


def test_cli_runs_baseline_replay_and_rejects_model_variant_without_bundle(
    replay: Replay, tmp_path: Path, capsys
) -> None:
    args = ["--data", str(replay.folder), "--out", str(tmp_path), "--max-users", "400"]
    assert main([*args, "--control", "popularity", "--treatment", "itemknn"]) == 0
    assert "itemknn" in capsys.readouterr().out
    assert main([*args, "--treatment", "ranker"]) == 2
    assert "--bundle" in capsys.readouterr().err
