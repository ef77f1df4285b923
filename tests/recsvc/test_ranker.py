from __future__ import annotations

import json
import threading
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from recsvc.config import RankerConfig
from recsvc.ranker import (
    K_ZERO_THRESHOLD,
    LANES,
    META_FILE,
    MODEL_FILE,
    Ranker,
    RankerInputError,
    RankerLoadError,
    UnsupportedModelError,
    compile_forest,
    float32_at_most,
    kernel_threshold,
    parse_forest,
    search_trials,
    threshold_probe,
)

NAMES = ["noise_a", "noise_b", "signal", "noise_c", "flag"]
SIGNAL = NAMES.index("signal")
CFG = RankerConfig(
    num_leaves=7,
    min_data_in_leaf=10,
    learning_rate=0.1,
    num_boost_round=40,
    early_stopping_rounds=10,
    search_trials=2,
    num_threads=1,
)


def ranking_set(n_groups: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups whose relevant rows are the ones with the largest `signal` value (plus a little noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_groups * size, len(NAMES))).astype(np.float32)
    x[:, NAMES.index("flag")] = rng.random(len(x)) < 0.2
    x[rng.random(x.shape) < 0.03] = np.nan
    y = np.zeros(len(x), dtype=np.int32)
    for g in range(n_groups):
        rows = np.arange(g * size, (g + 1) * size)
        noisy = np.nan_to_num(x[rows, SIGNAL], nan=-5.0) + rng.normal(scale=0.1, size=size)
        y[rows[np.argsort(-noisy)[:3]]] = 1
    return x, y, np.full(n_groups, size)


def mean_ndcg(scores: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int = 12) -> float:
    out, start = [], 0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for size in groups:
        s, rel = scores[start : start + size], y[start : start + size]
        start += size
        gains = (2.0 ** rel[np.argsort(-s, kind="stable")][:k] - 1) @ discounts[: min(k, size)]
        ideal = (2.0 ** np.sort(rel)[::-1][:k] - 1) @ discounts[: min(k, size)]
        out.append(gains / ideal if ideal > 0 else 0.0)
    return float(np.mean(out))


@pytest.fixture(scope="module")
def trained() -> Ranker:
    xt, yt, gt = ranking_set(150, 20, seed=1)
    xv, yv, gv = ranking_set(50, 20, seed=2)
    return Ranker.train(xt, yt, gt, xv, yv, gv, CFG, feature_names=NAMES)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ranker-cache")


def test_ranker_learns_the_informative_feature(trained: Ranker) -> None:
    x, y, g = ranking_set(60, 20, seed=3)
    learned = mean_ndcg(trained.predict_stock(x), y, g)
    random = mean_ndcg(np.random.default_rng(0).random(len(x)), y, g)
    assert learned > 0.85
    assert learned > random + 0.4
    importance = trained.feature_importance()
    assert max(importance, key=importance.get) == "signal"


def test_training_records_search_and_early_stopping_in_meta(trained: Ranker) -> None:
    assert len(trained.meta["trials"]) == 2
    best = max(t["valid_score"] for t in trained.meta["trials"])
    assert trained.meta["valid_score"] == pytest.approx(best)
    assert trained.meta["valid_metric"] == "ndcg@12"
    assert trained.booster.current_iteration() == trained.meta["best_iteration"]


def test_search_trials_start_with_configured_values_and_are_distinct() -> None:
    cfg = RankerConfig(num_leaves=63, min_data_in_leaf=50, learning_rate=0.05, search_trials=4)
    trials = search_trials(cfg)
    assert trials[0] == {"num_leaves": 63, "min_data_in_leaf": 50, "learning_rate": 0.05}
    assert len(trials) == 4
    assert len({tuple(sorted(t.items())) for t in trials}) == 4


def test_training_without_validation_uses_configured_rounds() -> None:
    x, y, g = ranking_set(40, 10, seed=4)
    ranker = Ranker.train(x, y, g, None, None, None, CFG, feature_names=NAMES)
    assert ranker.booster.current_iteration() == CFG.num_boost_round
    assert ranker.meta["valid_score"] is None


def test_fast_path_equals_stock_predict(trained: Ranker, cache_dir: Path) -> None:
    fast = trained.enable_fast_path(cache_dir)
    x, _, _ = ranking_set(25, 20, seed=5)
    probe = threshold_probe(trained.booster)
    assert fast.enabled, fast.reason
    for rows in (x, probe):
        np.testing.assert_allclose(trained.predict(rows), trained.predict_stock(rows), rtol=0, atol=1e-9)


def test_threshold_probe_lands_exactly_on_split_thresholds(trained: Ranker) -> None:
    probe = threshold_probe(trained.booster)
    dump = trained.booster.dump_model()["tree_info"][0]["tree_structure"]
    threshold = np.float32(dump["threshold"])
    assert (probe[:, dump["split_feature"]] == threshold).any()
    assert np.isnan(probe).any() and (probe == 0).any()


def test_concurrent_predictions_match_single_threaded(trained: Ranker, cache_dir: Path) -> None:
    trained.enable_fast_path(cache_dir)
    x, _, _ = ranking_set(10, 50, seed=6)
    want = trained.predict_stock(x)
    results: list[np.ndarray] = []

    def work() -> None:
        for _ in range(20):
            results.append(trained.predict(x))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 80
    for got in results:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_save_load_roundtrip_predicts_identically(trained: Ranker, tmp_path: Path, cache_dir: Path) -> None:
    trained.save(tmp_path / "ranker")
    loaded = Ranker.load(tmp_path / "ranker", expected_feature_names=NAMES, cache_dir=cache_dir)
    x, _, _ = ranking_set(10, 20, seed=7)
    assert loaded.fast_path.enabled
    assert loaded.feature_names == NAMES
    assert loaded.meta["best_iteration"] == trained.meta["best_iteration"]
    np.testing.assert_array_equal(loaded.predict_stock(x), trained.predict_stock(x))
    np.testing.assert_allclose(loaded.predict(x), trained.predict_stock(x), rtol=0, atol=1e-9)


def test_compiled_model_is_cached_and_a_corrupt_cache_is_rebuilt(trained: Ranker, tmp_path: Path) -> None:
    trained.save(tmp_path / "ranker")
    cache = tmp_path / "cache"
    Ranker.load(tmp_path / "ranker", cache_dir=cache)
    (obj,) = cache.glob("*.o")
    obj.write_bytes(b"not an object file")
    reloaded = Ranker.load(tmp_path / "ranker", cache_dir=cache)
    assert reloaded.fast_path.enabled
    assert obj.read_bytes() != b"not an object file"


def test_compile_failure_falls_back_to_stock_predict(trained: Ranker, tmp_path: Path) -> None:
    trained.save(tmp_path / "ranker")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    ranker = Ranker.load(tmp_path / "ranker", cache_dir=not_a_dir)
    x, _, _ = ranking_set(5, 20, seed=8)
    assert not ranker.fast_path.enabled
    assert ranker.fast_path.reason.startswith("compile failed")
    np.testing.assert_array_equal(ranker.predict(x), trained.predict_stock(x))


def test_load_rejects_features_the_code_does_not_compute(trained: Ranker, tmp_path: Path) -> None:
    trained.save(tmp_path)
    with pytest.raises(RankerLoadError, match=r"different features.*missing \['other'\]"):
        Ranker.load(tmp_path, expected_feature_names=[*NAMES[:-1], "other"], fast_path=False)


def test_meta_feature_names_disagreeing_with_model_is_rejected(trained: Ranker, tmp_path: Path) -> None:
    trained.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["feature_names"] = list(reversed(meta["feature_names"]))
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(RankerLoadError, match="different order"):
        Ranker.load(tmp_path, fast_path=False)


def test_missing_model_file_raises_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(RankerLoadError, match=r"ranker file missing: .*model\.txt"):
        Ranker.load(tmp_path)


def test_corrupt_model_file_raises_error_naming_it(trained: Ranker, tmp_path: Path) -> None:
    trained.save(tmp_path)
    (tmp_path / MODEL_FILE).write_text("tree\nnot a model\n")
    with pytest.raises(RankerLoadError, match=r"model\.txt is corrupt"):
        Ranker.load(tmp_path)


def test_predict_rejects_wrong_feature_count(trained: Ranker) -> None:
    with pytest.raises(RankerInputError, match="has 3 feature columns but the ranker expects 5"):
        trained.predict(np.zeros((2, 3), dtype=np.float32))


def test_group_sizes_must_cover_all_rows() -> None:
    x, y, g = ranking_set(5, 10, seed=9)
    with pytest.raises(RankerInputError, match="sum to the 50 rows"):
        Ranker.train(x, y, g[:-1], None, None, None, CFG, feature_names=NAMES)


def test_values_within_lightgbm_zero_threshold_score_like_zero_on_fast_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2000, len(NAMES))).astype(np.float32)
    x[:, SIGNAL] = rng.integers(-1, 2, len(x))  # -1 / 0 / +1: LightGBM splits at +-1e-35 around zero
    y = (x[:, SIGNAL] == 0).astype(np.int32) + (x[:, SIGNAL] > 0)
    ranker = Ranker.train(x, y, np.full(100, 20), None, None, None, CFG, feature_names=NAMES)
    lines = ranker.booster.model_to_string().splitlines()
    thresholds = [float(t) for line in lines if line.startswith("threshold=") for t in line[10:].split()]
    assert any(abs(t) < 1e-30 for t in thresholds)
    rows = np.repeat(x[:8], 4, axis=0)
    rows[:, SIGNAL] = np.tile(np.float32([1e-35, -1e-35, 1e-36, 0.0]), 8)
    assert ranker.enable_fast_path(tmp_path).enabled
    np.testing.assert_allclose(ranker.predict(rows), ranker.predict_stock(rows), rtol=0, atol=1e-9)


def test_nan_in_column_trained_without_missing_values_routes_as_zero_on_fast_path(tmp_path: Path) -> None:
    x, y, g = ranking_set(60, 20, seed=11)
    x = np.nan_to_num(x, nan=0.5)  # no NaN in training: LightGBM routes NaN as 0 at predict time
    ranker = Ranker.train(x, y, g, None, None, None, CFG, feature_names=NAMES)
    rows = x[:40].copy()
    rows[::2, SIGNAL] = np.nan
    rows[1::4, 0] = np.nan
    assert ranker.enable_fast_path(tmp_path).enabled
    np.testing.assert_allclose(ranker.predict(rows), ranker.predict_stock(rows), rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        ranker.predict(rows), ranker.predict_stock(np.nan_to_num(rows, nan=0.0)), atol=1e-9
    )


def test_background_compile_serves_stock_scores_then_switches_to_fast_path(
    trained: Ranker, tmp_path: Path
) -> None:
    trained.save(tmp_path / "ranker")
    ranker = Ranker.load(tmp_path / "ranker", background=True, cache_dir=tmp_path / "cache")
    x, _, _ = ranking_set(5, 20, seed=12)
    during = ranker.predict(x)
    ranker.enable_fast_path_in_background().join(timeout=120)
    assert ranker.fast_path.enabled
    np.testing.assert_allclose(during, trained.predict_stock(x), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ranker.predict(x), trained.predict_stock(x), rtol=0, atol=1e-9)


def booster_with_every_missing_type(zero_as_missing: bool) -> lgb.Booster:
    """A regression booster whose splits use missing types None (no NaN in training) and NaN, or
    with `zero_as_missing` only Zero; column 2 splits around 0 at +-1e-35."""
    rng = np.random.default_rng(20)
    x = rng.normal(size=(3000, 4))
    x[rng.random(len(x)) < 0.2, 1] = np.nan
    x[:, 2] = rng.choice([0.0, 1e-36, -1e-36, 2.0, -2.0], size=len(x))
    x[rng.random(len(x)) < 0.3, 3] = 0.0
    y = x[:, 0] + np.nan_to_num(x[:, 1], nan=3.0) + np.sign(x[:, 2]) + (x[:, 3] == 0)
    params = {
        "objective": "regression",
        "num_leaves": 15,
        "min_data_in_leaf": 5,
        "zero_as_missing": zero_as_missing,
        "num_threads": 1,
        "verbose": -1,
    }
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=30)


def awkward_rows(booster: lgb.Booster, n: int = 1000) -> np.ndarray:
    """Threshold probe rows (exact thresholds, NaN, 0, +-kZeroThreshold) plus tiny and huge values."""
    rows = threshold_probe(booster, n_rows=n).astype(np.float64)
    rng = np.random.default_rng(21)
    picks = rng.random(rows.shape)
    rows[picks < 0.03] = 1e-36
    rows[(picks >= 0.03) & (picks < 0.06)] = -1e-36
    rows[(picks >= 0.06) & (picks < 0.08)] = np.inf
    rows[(picks >= 0.08) & (picks < 0.1)] = -np.inf
    return rows


@pytest.mark.parametrize("zero_as_missing", [False, True])
def test_compiled_forest_is_bit_identical_to_booster_predict_for_every_missing_type(
    zero_as_missing: bool, tmp_path: Path
) -> None:
    booster = booster_with_every_missing_type(zero_as_missing)
    _, trees = parse_forest(booster.model_to_string())
    missing_types = {(d >> 2) & 3 for tree in trees for d in tree.decision_type}
    assert missing_types == ({1} if zero_as_missing else {0, 2})  # 0 None, 1 Zero, 2 NaN
    forest = compile_forest(booster.model_to_string(), tmp_path)
    rows = awkward_rows(booster)
    for x in (rows, rows.astype(np.float32)):
        np.testing.assert_array_equal(forest.predict(x), booster.predict(x))


def test_compiled_forest_reads_integer_input_as_float32_like_lightgbm(tmp_path: Path) -> None:
    booster = booster_with_every_missing_type(False)
    forest = compile_forest(booster.model_to_string(), tmp_path)
    ints = np.random.default_rng(22).integers(-(2**26), 2**26, size=(64, 4))
    np.testing.assert_array_equal(forest.predict(ints), booster.predict(ints))


@pytest.mark.parametrize("n_rows", [1, LANES - 1, LANES + 1, 3 * LANES])
def test_compiled_forest_scores_row_counts_that_are_not_a_multiple_of_the_vector_width(
    n_rows: int, trained: Ranker, cache_dir: Path
) -> None:
    forest = compile_forest(trained.booster.model_to_string(), cache_dir)
    x, _, _ = ranking_set(2, 20, seed=23)
    got = forest.predict(x[:n_rows])
    assert got.shape == (n_rows,)
    np.testing.assert_array_equal(got, trained.booster.predict(x[:n_rows]))


def test_threaded_prediction_of_many_rows_equals_single_threaded(trained: Ranker, cache_dir: Path) -> None:
    forest = compile_forest(trained.booster.model_to_string(), cache_dir)
    x, _, _ = ranking_set(61, 17, seed=24)  # 1037 rows: chunks of whole vectors plus a ragged tail
    np.testing.assert_array_equal(forest.predict(x, n_threads=3), forest.predict(x, n_threads=1))
    np.testing.assert_array_equal(forest.predict(x, n_threads=3), trained.booster.predict(x))


def test_concurrent_calls_with_different_inputs_each_get_their_own_scores(
    trained: Ranker, cache_dir: Path
) -> None:
    trained.enable_fast_path(cache_dir)
    inputs = [ranking_set(3, 10 + 7 * i, seed=30 + i)[0] for i in range(6)]
    wanted = [trained.predict_stock(x) for x in inputs]
    failures: list[int] = []

    def work(i: int) -> None:
        for _ in range(50):
            if not np.array_equal(trained.predict(inputs[i]), wanted[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trained.fast_path.enabled
    assert failures == []


def test_fast_path_probe_is_bit_identical(trained: Ranker, cache_dir: Path) -> None:
    fast = trained.enable_fast_path(cache_dir)
    assert fast.max_abs_diff == 0.0
    assert fast.bit_identical is True


@pytest.mark.parametrize("threshold", [-1.0, -K_ZERO_THRESHOLD, -1e-36, 0.0, 1e-36, K_ZERO_THRESHOLD, 0.5])
def test_kernel_threshold_gives_lightgbms_decision_on_raw_values(threshold: float) -> None:
    tiny = K_ZERO_THRESHOLD
    values = np.array(
        [
            -1.0,
            -2 * tiny,
            np.nextafter(-tiny, -1),
            -tiny,
            -1e-36,
            0.0,
            1e-36,
            tiny,
            np.nextafter(tiny, 1),
            1.0,
        ]
    )
    zeroed = np.where(np.abs(values) <= tiny, 0.0, values)
    np.testing.assert_array_equal(values <= kernel_threshold(threshold), zeroed <= threshold)


def test_categorical_model_is_served_by_stock_predict(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    x = np.column_stack([rng.integers(0, 6, 600), rng.normal(size=600)]).astype(np.float64)
    y = (x[:, 0] % 2) + x[:, 1]
    params = {"objective": "regression", "min_data_in_leaf": 5, "num_threads": 1, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(x, y, categorical_feature=[0]), num_boost_round=5)
    with pytest.raises(UnsupportedModelError, match="categorical"):
        parse_forest(booster.model_to_string())
    ranker = Ranker(booster, booster.feature_name())
    assert not ranker.enable_fast_path(tmp_path).enabled
    assert ranker.fast_path.reason.startswith("unsupported model")
    np.testing.assert_array_equal(ranker.predict(x[:50]), booster.predict(x[:50]))


def test_model_with_transformed_output_is_not_compiled() -> None:
    rng = np.random.default_rng(26)
    x = rng.normal(size=(300, 3))
    params = {"objective": "binary", "num_threads": 1, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(x, (x[:, 0] > 0).astype(int)), num_boost_round=3)
    with pytest.raises(UnsupportedModelError, match="objective 'binary"):
        parse_forest(booster.model_to_string())


def test_float32_comparison_against_rounded_down_threshold_matches_double_comparison() -> None:
    rng = np.random.default_rng(27)
    thresholds = np.concatenate(
        [rng.normal(size=200), rng.normal(size=50) * 1e-36, [0.0, 1e300, -1e300, 3.4e38, -3.4e38, 0.1, -0.1]]
    )
    base = rng.normal(size=300).astype(np.float32)
    for t in thresholds:
        with np.errstate(over="ignore"):
            near = np.float32(t)
        x = np.concatenate(
            [base, [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf))]]
        ).astype(np.float32)
        x = np.concatenate([x, np.float32([np.inf, -np.inf, np.finfo(np.float32).max])])
        bound = np.float32(float32_at_most(float(t)))
        np.testing.assert_array_equal(x <= bound, x.astype(np.float64) <= t)
