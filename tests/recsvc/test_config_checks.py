from __future__ import annotations

import math
from dataclasses import fields, is_dataclass, replace
from typing import Any

import pytest
import yaml

from recsvc.config import BaselineConfig, EncoderConfig, TrainConfig, from_dict
from recsvc.config_checks import ConfigValueError, check_train_config


def _with(cfg: Any, path: str, value: Any) -> Any:
    """`cfg` with the field at dotted `path` (as written in a config file) set to `value`."""
    head, _, rest = path.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: _with(getattr(cfg, head), rest, value)})


_NO_VALUE = object()

# One bad value per field: (path, bad value, the part of it the message must show when that is not
# the whole value, e.g. the element of a list).
BAD_TRAIN_VALUES: list[tuple[str, Any, Any]] = [
    ("eval_k", (12, 0), 0),
    ("eval_k", (), _NO_VALUE),
    ("split", 5, _NO_VALUE),
    ("data.event_weights", {"view": -1.0}, -1.0),
    ("data.event_weights", {}, _NO_VALUE),
    ("data.unknown_items", "ignore", _NO_VALUE),
    ("data.future_tolerance_s", -1, _NO_VALUE),
    ("split.test_days", 0, _NO_VALUE),
    ("split.valid_days", -1.0, _NO_VALUE),
    ("text.title_column", "", _NO_VALUE),
    ("text.attribute_columns", "category", _NO_VALUE),
    ("text.description_column", None, _NO_VALUE),
    ("text.description_chars", -1, _NO_VALUE),
    ("text.max_tokens", 2, _NO_VALUE),
    ("encoder.model_dir", "", _NO_VALUE),
    ("encoder.history_len", 0, _NO_VALUE),
    ("encoder.epochs", 0, _NO_VALUE),
    ("encoder.max_steps", 0, _NO_VALUE),
    ("encoder.batch_size", 0, _NO_VALUE),
    ("encoder.grad_accum", 0, _NO_VALUE),
    ("encoder.lr", -1, _NO_VALUE),
    ("encoder.tower_lr", 0.0, _NO_VALUE),
    ("encoder.weight_decay", -0.1, _NO_VALUE),
    ("encoder.temperature", 0, _NO_VALUE),
    ("encoder.logq_correction", "yes", _NO_VALUE),
    ("encoder.hard_negatives", -1, _NO_VALUE),
    ("encoder.max_train_pairs", -1, _NO_VALUE),
    ("encoder.eval_every", -1, _NO_VALUE),
    ("encoder.early_stopping_patience", 0, _NO_VALUE),
    ("encoder.seed", -1, _NO_VALUE),
    ("encoder.embed_batch_size", 0, _NO_VALUE),
    ("encoder.precision", "fp8", _NO_VALUE),
    ("encoder.warmup_frac", 1.5, _NO_VALUE),
    ("encoder.grad_clip", -1.0, _NO_VALUE),
    ("encoder.checkpoint_every", -1, _NO_VALUE),
    ("encoder.valid_k", 0, _NO_VALUE),
    ("encoder.valid_max_users", -1, _NO_VALUE),
    ("encoder.tower_refit_steps", -1, _NO_VALUE),
    ("encoder.tower_init_half_life_days", 0, _NO_VALUE),
    ("encoder.tower_holdout_pairs", -1, _NO_VALUE),
    ("encoder.trainable_layers", 0, _NO_VALUE),
    ("index.exact_max_items", -1, _NO_VALUE),
    ("index.hnsw_m", 1, _NO_VALUE),
    ("index.hnsw_ef_construction", 0, _NO_VALUE),
    ("index.hnsw_ef_search", 0, _NO_VALUE),
    ("index.use_gpu", "sometimes", _NO_VALUE),
    ("index.recall_sample_users", 0, _NO_VALUE),
    ("index.omp_threads", -1, _NO_VALUE),
    ("index.gpu_exact_max_items", -1, _NO_VALUE),
    ("index.ivf_nprobe", 0, _NO_VALUE),
    ("index.ann_kind", "flat", _NO_VALUE),
    ("candidates.ann", -5, _NO_VALUE),
    ("candidates.repeat", -1, _NO_VALUE),
    ("candidates.popular", -1, _NO_VALUE),
    ("candidates.cooccurrence", -1, _NO_VALUE),
    ("candidates.cooc_neighbours", 0, _NO_VALUE),
    ("candidates.cooc_half_life_days", 0, _NO_VALUE),
    ("candidates.popularity_window_days", -3.0, _NO_VALUE),
    ("candidates.max_candidates", 0, _NO_VALUE),
    ("candidates.cf", -1, _NO_VALUE),
    ("collaborative.enabled", "false", _NO_VALUE),
    ("collaborative.factors", 0, _NO_VALUE),
    ("collaborative.regularization", -0.05, _NO_VALUE),
    ("collaborative.iterations", 0, _NO_VALUE),
    ("collaborative.alpha", 0, _NO_VALUE),
    ("collaborative.half_life_days", -1, _NO_VALUE),
    ("collaborative.threads", -1, _NO_VALUE),
    ("collaborative.seed", 2**31, _NO_VALUE),
    ("collaborative.exact_max_items", -1, _NO_VALUE),
    ("collaborative.ivf_nprobe", 0, _NO_VALUE),
    ("ranker.num_leaves", 1, _NO_VALUE),
    ("ranker.learning_rate", 0, _NO_VALUE),
    ("ranker.num_boost_round", 0, _NO_VALUE),
    ("ranker.min_data_in_leaf", -1, _NO_VALUE),
    ("ranker.feature_fraction", 0.0, _NO_VALUE),
    ("ranker.bagging_fraction", 1.2, _NO_VALUE),
    ("ranker.early_stopping_rounds", 0, _NO_VALUE),
    ("ranker.max_train_users", 0, _NO_VALUE),
    ("ranker.train_label_windows", 0, _NO_VALUE),
    ("ranker.search_trials", 0, _NO_VALUE),
    ("ranker.seed", -1, _NO_VALUE),
    ("ranker.num_threads", -1, _NO_VALUE),
    ("ranker.eval_at", 0, _NO_VALUE),
    ("ranker.novel_ranker", 1, _NO_VALUE),
    ("pipeline.max_catalogue_items", 0, _NO_VALUE),
    ("pipeline.catalogue_half_life_days", 0, _NO_VALUE),
    ("pipeline.cpu_max_catalogue_items", 0, _NO_VALUE),
    ("pipeline.cpu_max_finetune_steps", 0, _NO_VALUE),
    ("pipeline.cpu_trainable_layers", 0, _NO_VALUE),
    ("pipeline.cpu_max_tokens", 0, _NO_VALUE),
    ("pipeline.cpu_finetune_validation", "no", _NO_VALUE),
    ("pipeline.cpu_eval_max_users", 0, _NO_VALUE),
    ("pipeline.cpu_ranker_max_train_users", -1, _NO_VALUE),
    ("pipeline.cpu_ranker_search_trials", 0, _NO_VALUE),
    ("pipeline.seed", -1, _NO_VALUE),
    ("baselines.popularity_window_days", 0, _NO_VALUE),
    ("baselines.repeat_half_life_days", -1, _NO_VALUE),
    ("baselines.knn_neighbours", 0, _NO_VALUE),
    ("baselines.knn_history_half_life_days", 0, _NO_VALUE),
    ("baselines.knn_cooc_half_life_days", 0, _NO_VALUE),
    ("baselines.als_factors", 0, _NO_VALUE),
    ("baselines.als_regularization", -1, _NO_VALUE),
    ("baselines.als_iterations", 0, _NO_VALUE),
    ("baselines.als_alpha", 0, _NO_VALUE),
    ("baselines.als_threads", -1, _NO_VALUE),
    ("baselines.batch_users", 0, _NO_VALUE),
    ("baselines.seed", -1, _NO_VALUE),
    ("baselines.grids", {"als": {"factors": [32, 0]}}, 0),
    ("eval.ks", (), _NO_VALUE),
    ("eval.modes", ("all", "recent"), "recent"),
    ("eval.systems", ("bert",), "bert"),
    ("eval.max_users", 0, _NO_VALUE),
    ("eval.tune", "true", _NO_VALUE),
    ("eval.tune_metric", "auc@12", _NO_VALUE),
    ("eval.tune_mode", "cold", _NO_VALUE),
    ("eval.tune_max_users", 0, _NO_VALUE),
    ("eval.seed", -1, _NO_VALUE),
]


def _field_paths(section: Any, prefix: str = "") -> set[str]:
    paths = set()
    for f in fields(section):
        path = f"{prefix}{f.name}"
        value = getattr(section, f.name)
        paths |= _field_paths(value, f"{path}.") if is_dataclass(value) else {path}
    return paths


def test_the_default_train_config_passes() -> None:
    check_train_config(TrainConfig())


def test_every_train_config_field_has_a_bad_value_case() -> None:
    assert _field_paths(TrainConfig()) == {path for path, _, _ in BAD_TRAIN_VALUES} - {"split"}


@pytest.mark.parametrize(
    ("path", "bad", "shown"), BAD_TRAIN_VALUES, ids=[f"{p}={b!r}" for p, b, _ in BAD_TRAIN_VALUES]
)
def test_a_bad_value_is_rejected_naming_the_field_and_the_value(path: str, bad: Any, shown: Any) -> None:
    with pytest.raises(ConfigValueError) as info:
        check_train_config(_with(TrainConfig(), path, bad))
    message = str(info.value)
    assert message.startswith(path)
    assert f"got {bad if shown is _NO_VALUE else shown!r}" in message


def test_the_message_reads_like_the_config_file() -> None:
    bad = _with(TrainConfig(), "ranker.train_label_windows", 0)
    with pytest.raises(ConfigValueError, match=r"^ranker\.train_label_windows must be >= 1, got 0$"):
        check_train_config(bad)


def test_config_value_error_is_a_value_error() -> None:
    assert issubclass(ConfigValueError, ValueError)


@pytest.mark.parametrize(
    "path",
    [
        "encoder.model_dir",
        "encoder.max_steps",
        "encoder.trainable_layers",
        "pipeline.max_catalogue_items",
        "pipeline.cpu_max_catalogue_items",
        "pipeline.cpu_max_finetune_steps",
        "pipeline.cpu_trainable_layers",
        "pipeline.cpu_max_tokens",
        "pipeline.cpu_eval_max_users",
        "pipeline.cpu_ranker_max_train_users",
        "pipeline.cpu_ranker_search_trials",
        "eval.max_users",
        "eval.tune_max_users",
    ],
)
def test_none_is_accepted_where_the_field_is_optional(path: str) -> None:
    check_train_config(_with(TrainConfig(), path, None))


def test_an_optional_field_says_none_is_allowed() -> None:
    with pytest.raises(ConfigValueError, match=r"^encoder\.max_steps must be >= 1 or None, got 0$"):
        check_train_config(_with(TrainConfig(), "encoder.max_steps", 0))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("candidates.cf", 0),  # 0 turns the source off
        ("encoder.grad_clip", 0.0),  # 0: no clipping
        ("encoder.eval_every", 0),
        ("encoder.warmup_frac", 1.0),
        ("ranker.bagging_fraction", 1.0),
        ("collaborative.half_life_days", 0),
        ("text.max_tokens", 3),
        ("text.attribute_columns", ()),
        ("eval.systems", ()),  # no baselines
        ("encoder.lr", 1),  # an integer where a number is expected (YAML `lr: 1`)
        ("baselines.grids", {}),
    ],
)
def test_boundary_values_the_code_supports_are_accepted(path: str, value: Any) -> None:
    check_train_config(_with(TrainConfig(), path, value))


@pytest.mark.parametrize(("path", "bad"), [("encoder.lr", math.nan), ("split.test_days", math.inf)])
def test_non_finite_numbers_are_rejected(path: str, bad: float) -> None:
    with pytest.raises(ConfigValueError, match=rf"^{path} must be a finite number"):
        check_train_config(_with(TrainConfig(), path, bad))


def test_a_boolean_is_not_taken_for_an_integer() -> None:
    with pytest.raises(ConfigValueError, match=r"^encoder\.epochs must be an integer >= 1, got True$"):
        check_train_config(_with(TrainConfig(), "encoder.epochs", True))


def test_an_exponent_yaml_read_as_text_gets_a_hint() -> None:
    cfg = from_dict(TrainConfig, yaml.safe_load("encoder: {lr: 3e-5}"))
    with pytest.raises(ConfigValueError, match=r"^encoder\.lr .*got '3e-5'.*write 3\.0e-5"):
        check_train_config(cfg)


def test_event_weights_name_the_event_type() -> None:
    with pytest.raises(ConfigValueError, match=r"^data\.event_weights\.cart must be >= 0, got -4\.0$"):
        check_train_config(_with(TrainConfig(), "data.event_weights", {"view": 1.0, "cart": -4.0}))


@pytest.mark.parametrize(
    ("grids", "expected"),
    [
        ({"bpr": {"factors": [8]}}, r"^baselines\.grids\.bpr is not a baseline"),
        ({"als": {"factorz": [8]}}, r"^baselines\.grids\.als\.factorz is not a parameter of als"),
        ({"als": {"factors": []}}, r"^baselines\.grids\.als\.factors must be a non-empty list, got \[\]$"),
        ({"als": [8]}, r"^baselines\.grids\.als must be a mapping"),
        (
            {"itemknn": {"neighbours": [20, 0]}},
            r"^baselines\.grids\.itemknn\.neighbours\[1\] must be >= 1, got 0$",
        ),
    ],
)
def test_tuning_grids_name_the_baseline_parameter_and_value(grids: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigValueError, match=expected):
        check_train_config(_with(TrainConfig(), "baselines.grids", grids))


def test_every_encoder_precision_is_accepted() -> None:
    from recsvc.encoder import PRECISIONS

    for precision in PRECISIONS:
        check_train_config(_with(TrainConfig(), "encoder.precision", precision))


def test_every_evaluation_mode_and_system_is_accepted() -> None:
    from training.eval_cli import SYSTEM_NAMES
    from training.evaluate import MODES

    check_train_config(_with(TrainConfig(), "eval.modes", tuple(MODES)))
    check_train_config(_with(TrainConfig(), "eval.systems", tuple(SYSTEM_NAMES)))
    for mode in MODES:
        check_train_config(_with(TrainConfig(), "eval.tune_mode", mode))


def test_every_baseline_parameter_can_be_tuned_at_its_default() -> None:
    from training.baselines import BASELINES, baseline_params

    defaults = BaselineConfig()
    grids = {name: {p: [v] for p, v in baseline_params(name, defaults).items()} for name in BASELINES}
    check_train_config(_with(TrainConfig(), "baselines.grids", grids))


def test_every_tunable_metric_name_the_evaluation_reports_is_accepted() -> None:
    import numpy as np

    from training.evaluate import _mode_metrics

    recs = np.array([[0, 1]], dtype=np.int64)
    metrics = _mode_metrics(
        recs, np.array([0]), np.array([1]), np.array([], np.int64), np.zeros(3, bool), (2,), 3
    )
    for name in (m for m in metrics if m.endswith("@2")):
        check_train_config(_with(TrainConfig(), "eval.tune_metric", name))


def test_a_programmatic_config_is_not_checked_on_construction() -> None:
    # Tests and benchmarks build tiny configs; only the entry points check.
    assert EncoderConfig(epochs=0).epochs == 0
