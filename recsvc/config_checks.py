"""Range checks of the training configuration, run where a user's config enters (training/cli.py).

A config file can hold any value; the stages would fail deep inside a job (or quietly do something
else) on one they cannot use. `check_train_config` rejects such values up front, naming the field
as it is written in a config file. Not in the dataclasses' `__post_init__`: tests and benchmarks
build small configs programmatically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from recsvc.config import (
    BaselineConfig,
    CandidateConfig,
    CollaborativeConfig,
    DataConfig,
    EncoderConfig,
    EvalConfig,
    IndexConfig,
    PipelineConfig,
    RankerConfig,
    SplitConfig,
    TextConfig,
    TrainConfig,
)


class ConfigValueError(ValueError):
    """A config field holds a value its stage cannot use; the message names section.field and the value."""


# A rule returns None for a good value, else the rest of the error message after the field's path:
# " must be >= 1, got 0", or "[2] must be ..." / ".view must be ..." for an element of a collection.
_Rule = Callable[[Any], "str | None"]

_SEED_MAX = 2**31 - 1  # LightGBM takes a C int; numpy and torch accept anything in [0, this]


def _must(requirement: str, value: Any) -> str:
    return f" must be {requirement}, got {value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(lo: int, hi: int | None = None) -> _Rule:
    bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def rule(value: Any) -> str | None:
        if not _is_int(value):
            return _must(f"an integer {bounds}", value)
        if value < lo or (hi is not None and value > hi):
            return _must(bounds, value)
        return None

    return rule


def _real(lo: float, hi: float | None = None, *, open_lo: bool = False) -> _Rule:
    """A finite number (ints accepted) >= lo, or > lo with `open_lo`, and <= hi when given."""
    if hi is None:
        bounds = f"> {lo:g}" if open_lo else f">= {lo:g}"
    else:
        bounds = f"in {'(' if open_lo else '['}{lo:g}, {hi:g}]"

    def rule(value: Any) -> str | None:
        if not _is_real(value):
            return _must(f"a finite number {bounds}", value) + _yaml_number_hint(value)
        if value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
            return _must(bounds, value)
        return None

    return rule


def _yaml_number_hint(value: Any) -> str:
    """PyYAML (YAML 1.1) reads `3e-5` as text, only `3.0e-5` as a number: easy to miss, so say so."""
    if not isinstance(value, str) or "e" not in value.lower():
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (YAML reads an exponent without a decimal point as text: write 3.0e-5, not 3e-5)"


def _optional(rule: _Rule) -> _Rule:
    """None (the field's "no limit"/"default") or a value `rule` accepts."""

    def optional(value: Any) -> str | None:
        problem = None if value is None else rule(value)
        return None if problem is None else problem.replace(", got", " or None, got", 1)

    return optional


def _one_of(*choices: str) -> _Rule:
    def rule(value: Any) -> str | None:
        if isinstance(value, str) and value in choices:
            return None
        return _must(f"one of {', '.join(map(repr, choices))}", value)

    return rule


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else _must("true or false", value)


def _name(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else _must("a non-empty string", value)


def _list_of(item: _Rule, *, non_empty: bool = True) -> _Rule:
    """A list (YAML sequence; tuples once loaded) whose every element `item` accepts."""

    def rule(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or (non_empty and not value):
            return _must("a non-empty list" if non_empty else "a list", value)
        for i, element in enumerate(value):
            problem = item(element)
            if problem is not None:
                return f"[{i}]{problem}"
        return None

    return rule


def _event_weights(value: Any) -> str | None:
    if not isinstance(value, dict) or not value:
        return _must("a non-empty mapping of event type -> weight", value)
    weight = _real(0.0)
    for event, w in value.items():
        if not isinstance(event, str) or not event.strip():
            return _must("keyed by non-empty event type names", value)
        problem = weight(w)
        if problem is not None:
            return f".{event}{problem}"
    return None


# Metric names of training/evaluate.py's per-K metrics; tuning reads "<name>@<K>".
_TUNE_METRICS = ("recall", "precision", "ndcg", "map", "hit_rate", "coverage", "cold_recall", "repeat_share")


def _tune_metric(value: Any) -> str | None:
    name, _, k = value.partition("@") if isinstance(value, str) else ("", "", "")
    if name in _TUNE_METRICS and k.isdigit() and int(k) >= 1:
        return None
    return _must(f"'<metric>@<K>' with K >= 1 and metric one of {', '.join(_TUNE_METRICS)}", value)


# Constructor parameters of each baseline (training/baselines.py baseline_params) -> the BaselineConfig
# field whose rule its tuning grid values must pass.
_BASELINE_PARAMETERS: dict[str, dict[str, str]] = {
    name: {"popularity_window_days": "popularity_window_days", "batch_users": "batch_users", **own}
    for name, own in {
        "popularity": {},
        "repeat_pop": {"repeat_half_life_days": "repeat_half_life_days"},
        "itemknn": {
            "neighbours": "knn_neighbours",
            "history_half_life_days": "knn_history_half_life_days",
            "cooc_half_life_days": "knn_cooc_half_life_days",
        },
        "als": {
            "factors": "als_factors",
            "regularization": "als_regularization",
            "iterations": "als_iterations",
            "alpha": "als_alpha",
            "threads": "als_threads",
            "seed": "seed",
        },
    }.items()
}


def _grids(value: Any) -> str | None:
    """{baseline: {parameter: [values]}}: known baselines and parameters, each value in its field's range."""
    if not isinstance(value, dict):
        return _must("a mapping of baseline -> {parameter: [values]}", value)
    for system, grid in value.items():
        parameters = _BASELINE_PARAMETERS.get(system)
        if parameters is None:
            return f".{system} is not a baseline; choose from {', '.join(_BASELINE_PARAMETERS)}"
        if not isinstance(grid, dict):
            return f".{system}{_must('a mapping of parameter -> [values]', grid)}"
        for parameter, values in grid.items():
            if parameter not in parameters:
                return f".{system}.{parameter} is not a parameter of {system}; choose from {', '.join(parameters)}"
            problem = _list_of(_RULES[BaselineConfig][parameters[parameter]])(values)
            if problem is not None:
                return f".{system}.{parameter}{problem}"
    return None


_SEED = _int(0, _SEED_MAX)
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # recsvc/encoder.py PRECISIONS
_EVAL_MODES = ("all", "novel")  # training/evaluate.py MODES
_EVAL_SYSTEMS = (*_BASELINE_PARAMETERS, "raw_encoder")  # training/eval_cli.py SYSTEM_NAMES
_MIN_TOKENS = 3  # [CLS] + one word piece + [SEP]; with 2 every text is empty, 1 is ignored by the tokenizer

# Every field of every section, with the values its stage can use (read where the field is used).
# A section-valued field maps to its section class. 0 often means "off"/"all" where the code says so.
_RULES: dict[type, dict[str, Any]] = {
    TrainConfig: {
        "data": DataConfig,
        "split": SplitConfig,
        "text": TextConfig,
        "encoder": EncoderConfig,
        "index": IndexConfig,
        "candidates": CandidateConfig,
        "collaborative": CollaborativeConfig,
        "ranker": RankerConfig,
        "eval_k": _list_of(_int(1)),
        "baselines": BaselineConfig,
        "eval": EvalConfig,
        "pipeline": PipelineConfig,
    },
    DataConfig: {
        "event_weights": _event_weights,
        "unknown_items": _one_of("drop", "reject"),
        "future_tolerance_s": _int(0),
    },
    SplitConfig: {"test_days": _real(0.0, open_lo=True), "valid_days": _real(0.0, open_lo=True)},
    TextConfig: {
        "title_column": _name,
        "attribute_columns": _list_of(_name, non_empty=False),
        "description_column": _name,
        "description_chars": _int(0),  # 0: no description
        "max_tokens": _int(_MIN_TOKENS),
    },
    EncoderConfig: {
        "model_dir": _optional(_name),
        "history_len": _int(1),
        "epochs": _int(1),
        "max_steps": _optional(_int(1)),
        "batch_size": _int(1),
        "grad_accum": _int(1),
        "lr": _real(0.0, open_lo=True),
        "tower_lr": _real(0.0, open_lo=True),
        "weight_decay": _real(0.0),
        "temperature": _real(0.0, open_lo=True),
        "logq_correction": _flag,
        "hard_negatives": _int(0),
        "max_train_pairs": _int(0),  # 0: every pair
        "eval_every": _int(0),  # 0: no validation during training
        "early_stopping_patience": _int(1),
        "seed": _SEED,
        "embed_batch_size": _int(1),
        "precision": _one_of(*_PRECISIONS),
        "warmup_frac": _real(0.0, 1.0),
        "grad_clip": _real(0.0),  # 0: no clipping
        "checkpoint_every": _int(0),  # 0: no checkpoints
        "valid_k": _int(1),
        "valid_max_users": _int(0),  # 0: every validation user
        "tower_refit_steps": _int(0),  # 0: no refit
        "tower_init_half_life_days": _real(0.0, open_lo=True),
        "tower_holdout_pairs": _int(0),  # 0: no hold-out
        "trainable_layers": _optional(_int(1)),
    },
    IndexConfig: {
        "exact_max_items": _int(0),
        "hnsw_m": _int(2),  # FAISS aborts the process on M = 0
        "hnsw_ef_construction": _int(1),
        "hnsw_ef_search": _int(1),
        "use_gpu": _one_of("auto", "never", "always"),
        "recall_sample_users": _int(1),
        "omp_threads": _int(0),  # 0: FAISS's default
        "gpu_exact_max_items": _int(0),
        "ivf_nprobe": _int(1),
        "ann_kind": _one_of("hnsw", "ivf"),
    },
    CandidateConfig: {
        "ann": _int(1),
        "repeat": _int(0),  # 0 turns a source off
        "popular": _int(0),
        "cooccurrence": _int(0),
        "cooc_neighbours": _int(1),
        "cooc_half_life_days": _real(0.0, open_lo=True),
        "popularity_window_days": _real(0.0, open_lo=True),
        "max_candidates": _int(1),
        "cf": _int(0),
    },
    CollaborativeConfig: {
        "enabled": _flag,
        "factors": _int(1),
        "regularization": _real(0.0),
        "iterations": _int(1),
        "alpha": _real(0.0, open_lo=True),
        "half_life_days": _real(0.0),  # 0: no decay
        "threads": _int(0),  # 0: all cores
        "seed": _SEED,
        "exact_max_items": _int(0),
        "ivf_nprobe": _int(1),
    },
    RankerConfig: {
        "num_leaves": _int(2, 131_072),  # LightGBM's limits
        "learning_rate": _real(0.0, open_lo=True),
        "num_boost_round": _int(1),
        "min_data_in_leaf": _int(0),
        "feature_fraction": _real(0.0, 1.0, open_lo=True),
        "bagging_fraction": _real(0.0, 1.0, open_lo=True),
        "early_stopping_rounds": _int(1),
        "max_train_users": _int(1),
        "train_label_windows": _int(1),
        "search_trials": _int(1),
        "seed": _SEED,
        "num_threads": _int(0),  # 0: LightGBM's default
        "eval_at": _int(1),
        "novel_ranker": _flag,
    },
    PipelineConfig: {
        "max_catalogue_items": _optional(_int(1)),
        "catalogue_half_life_days": _real(0.0, open_lo=True),
        "cpu_max_catalogue_items": _optional(_int(1)),
        "cpu_max_finetune_steps": _optional(_int(1)),
        "cpu_trainable_layers": _optional(_int(1)),
        "cpu_max_tokens": _optional(_int(_MIN_TOKENS)),
        "cpu_finetune_validation": _flag,
        "cpu_eval_max_users": _optional(_int(1)),
        "cpu_ranker_max_train_users": _optional(_int(1)),
        "cpu_ranker_search_trials": _optional(_int(1)),
        "seed": _SEED,
    },
    BaselineConfig: {
        "popularity_window_days": _real(0.0, open_lo=True),
        "repeat_half_life_days": _real(0.0, open_lo=True),
        "knn_neighbours": _int(1),
        "knn_history_half_life_days": _real(0.0, open_lo=True),
        "knn_cooc_half_life_days": _real(0.0, open_lo=True),
        "als_factors": _int(1),
        "als_regularization": _real(0.0),
        "als_iterations": _int(1),
        "als_alpha": _real(0.0, open_lo=True),
        "als_threads": _int(0),
        "batch_users": _int(1),
        "seed": _SEED,
        "grids": _grids,
    },
    EvalConfig: {
        "ks": _list_of(_int(1)),
        "modes": _list_of(_one_of(*_EVAL_MODES)),
        "systems": _list_of(_one_of(*_EVAL_SYSTEMS), non_empty=False),  # (): no baselines
        "max_users": _optional(_int(1)),
        "tune": _flag,
        "tune_metric": _tune_metric,
        "tune_mode": _one_of(*_EVAL_MODES),
        "tune_max_users": _optional(_int(1)),
        "seed": _SEED,
    },
}


def _check_section(section: Any, path: str) -> None:
    """Raise ConfigValueError for the first field of `section` (a config dataclass with rules in
    `_RULES`, reached in config files as `path`) that holds a value its stage cannot use."""
    for f in fields(section):
        value = getattr(section, f.name)
        where = f"{path}.{f.name}" if path else f.name
        rule = _RULES[type(section)][f.name]
        if isinstance(rule, type):
            if not isinstance(value, rule):
                raise ConfigValueError(f"{where}{_must(f'a mapping of {rule.__name__} options', value)}")
            _check_section(value, where)
            continue
        problem = rule(value)
        if problem is not None:
            raise ConfigValueError(f"{where}{problem}")


def check_train_config(cfg: TrainConfig) -> None:
    """Raise ConfigValueError naming the first field (e.g. `ranker.train_label_windows`) whose value
    the pipeline cannot use, before any work starts."""
    _check_section(cfg, "")
