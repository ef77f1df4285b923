"""LightGBM lambdarank ranker with a compiled, verified prediction fast path.

Training: early stopping on validation NDCG@`eval_at` and a small deterministic search over
num_leaves / min_data_in_leaf / learning_rate (the first trial is always the configured values).

Serving: stock `Booster.predict` pays per-call overhead and walks trees through generic code;
`lleaves` compiles the trees to native code with LLVM (in-process, no C compiler needed), which is
several times faster on the few hundred candidate rows a request ranks. The compiled object is cached
on disk keyed by model text, lleaves version, compile options and host CPU, so a reload is instant.
The fast path is only used after it reproduced `Booster.predict` on a probe that hits split
thresholds exactly, NaNs and zeros; any failure falls back to stock predict with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from recsvc.config import RankerConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.txt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
# Equality required of the fast path, relative to the scale of the probe's scores.
FAST_PATH_RTOL = 1e-6
PROBE_ROWS = 512
# LightGBM's predictor drops |value| <= kZeroThreshold as an implicit zero before walking trees;
# lleaves compares the raw value, so such values are zeroed first to keep scores identical.
K_ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM: `const double kZeroThreshold = 1e-35f`
# lleaves cache-blocks trees in groups of this size (its default; see benchmarks/bench_ranker.py).
FBLOCKSIZE = 34
# Above this many rows a prediction is split over threads.
PARALLEL_MIN_ROWS = 20_000
SEARCH_GRID: dict[str, tuple[Any, ...]] = {
    "num_leaves": (15, 31, 63, 127),
    "min_data_in_leaf": (20, 50, 100),
    "learning_rate": (0.03, 0.05, 0.1),
}


class RankerInputError(ValueError):
    """Training or prediction arrays with the wrong shape, type or content."""


class RankerLoadError(RuntimeError):
    """A saved ranker that cannot be used: missing/corrupt file or feature names that do not match."""


def default_cache_dir() -> Path:
    """Where compiled models are cached: $RECSVC_CACHE_DIR/lleaves, else ~/.cache/recsvc/lleaves."""
    root = os.environ.get("RECSVC_CACHE_DIR") or Path.home() / ".cache" / "recsvc"
    return Path(root) / "lleaves"


# ------------------------------------------------------------------ training maths


def _check_matrix(X: Any, name: str, n_features: int | None = None) -> np.ndarray:
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise RankerInputError(f"{name} must be a 2-D array [rows, features], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise RankerInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if n_features is not None and arr.shape[1] != n_features:
        raise RankerInputError(
            f"{name} has {arr.shape[1]} feature columns but the ranker expects {n_features}"
        )
    return arr


def _check_set(X: Any, y: Any, groups: Any, name: str, n_features: int) -> tuple[np.ndarray, ...]:
    """Validated (features, labels, group sizes) of one ranking set."""
    x = _check_matrix(X, f"{name} features", n_features)
    labels = np.asarray(y)
    g = np.asarray(groups)
    if labels.shape != (len(x),):
        raise RankerInputError(f"{name} labels have shape {labels.shape}, expected ({len(x)},)")
    if not np.isfinite(labels).all() or (labels < 0).any() or (labels != np.round(labels)).any():
        raise RankerInputError(f"{name} labels must be non-negative integer relevance grades")
    if g.ndim != 1 or (g <= 0).any() or int(g.sum()) != len(x):
        raise RankerInputError(
            f"{name} group sizes must be positive and sum to the {len(x)} rows, got sum {g.sum()}"
        )
    return x, labels.astype(np.int32), g.astype(np.int64)


def search_trials(cfg: RankerConfig) -> list[dict[str, Any]]:
    """The configured parameters first, then distinct grid points in a seed-fixed order."""
    first = {
        "num_leaves": cfg.num_leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "learning_rate": cfg.learning_rate,
    }
    trials = [first]
    rng = np.random.default_rng(cfg.seed)
    grid = [
        {"num_leaves": a, "min_data_in_leaf": b, "learning_rate": c}
        for a in SEARCH_GRID["num_leaves"]
        for b in SEARCH_GRID["min_data_in_leaf"]
        for c in SEARCH_GRID["learning_rate"]
    ]
    for i in rng.permutation(len(grid)):
        if len(trials) >= max(1, cfg.search_trials):
            break
        if grid[i] not in trials:
            trials.append(grid[i])
    return trials


def _base_params(cfg: RankerConfig) -> dict[str, Any]:
    params: dict[str, Any] = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [cfg.eval_at],
        "feature_fraction": cfg.feature_fraction,
        "bagging_fraction": cfg.bagging_fraction,
        "bagging_freq": 1 if cfg.bagging_fraction < 1.0 else 0,
        "seed": cfg.seed,
        "deterministic": True,
        "force_col_wise": True,
        "verbose": -1,
    }
    if cfg.num_threads:
        params["num_threads"] = cfg.num_threads
    return params


# ------------------------------------------------------------------ fast path


@dataclass(frozen=True)
class Split:
    """One split node as written in LightGBM's text model."""

    feature: int
    threshold: float
    decision_type: int

    @property
    def missing_type(self) -> int:
        """0 = None (NaN is treated as 0), 1 = Zero, 2 = NaN (LightGBM's MissingType)."""
        return (self.decision_type >> 2) & 3


def model_splits(model_text: str) -> list[Split]:
    """Every split node of every tree, parsed from the text model (no pandas needed)."""
    out: list[Split] = []
    tree: dict[str, list[str]] = {}
    for line in model_text.splitlines():
        key, _, value = line.partition("=")
        if key in ("split_feature", "threshold", "decision_type"):
            tree[key] = value.split()
        if len(tree) == 3:
            out.extend(
                Split(int(f), float(t), int(d))
                for f, t, d in zip(tree["split_feature"], tree["threshold"], tree["decision_type"])
            )
            tree = {}
    return out


def threshold_probe(booster: lgb.Booster, n_rows: int = PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """float32 rows whose values sit exactly on, just below and just above the model's split thresholds.

    Random data rarely lands on a threshold, so it would miss float32/float64 rounding bugs; this
    probe also mixes in NaN, 0 and +-1e-35 (LightGBM's zero threshold) so missing-value routing
    and implicit zeros are compared too.
    """
    n_features = booster.num_feature()
    per_feature: list[list[float]] = [[] for _ in range(n_features)]
    for split in model_splits(booster.model_to_string()):
        per_feature[split.feature].append(split.threshold)
    rng = np.random.default_rng(seed)
    probe = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    for f, thresholds in enumerate(per_feature):
        if not thresholds:
            continue
        finite32 = np.finfo(np.float32).max
        picked = np.asarray(thresholds)[rng.integers(0, len(thresholds), n_rows)]
        values = np.clip(picked, -finite32, finite32).astype(np.float32)
        nudge = rng.integers(-1, 2, n_rows)
        values = np.where(nudge < 0, np.nextafter(values, np.float32(-finite32)), values)
        values = np.where(nudge > 0, np.nextafter(values, np.float32(finite32)), values)
        probe[:, f] = values
    special = rng.random(probe.shape)
    probe[special < 0.05] = np.nan
    probe[(special >= 0.05) & (special < 0.1)] = 0.0
    probe[(special >= 0.1) & (special < 0.12)] = np.float32(K_ZERO_THRESHOLD)
    probe[(special >= 0.12) & (special < 0.14)] = -np.float32(K_ZERO_THRESHOLD)
    return probe


def compiled_predict(model: Any, x: np.ndarray, n_jobs: int = 1) -> np.ndarray:
    """lleaves predict with LightGBM's input semantics: |value| <= kZeroThreshold is an exact zero
    (LightGBM drops such values before walking trees; lleaves would compare them raw)."""
    rows = np.array(x, dtype=np.float64, order="C")
    rows[np.abs(rows) <= K_ZERO_THRESHOLD] = 0.0
    return model.predict(rows, n_jobs=n_jobs)


def _cache_key(model_text: str, options: dict[str, Any]) -> str:
    import lleaves
    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:
        features = ""
    blob = json.dumps(
        [model_text, getattr(lleaves, "__version__", "?"), llvm.get_host_cpu_name(), features, options]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def compile_lleaves(model_text: str, cache_dir: Path | None, fblocksize: int = FBLOCKSIZE) -> Any:
    """A compiled lleaves model, reusing a checksummed object from `cache_dir` when present."""
    import lleaves

    options = {"fblocksize": fblocksize, "use_fp64": True}
    with tempfile.TemporaryDirectory(prefix="recsvc-lleaves-") as tmp:
        model_path = Path(tmp) / MODEL_FILE
        model_path.write_text(model_text)
        model = lleaves.Model(model_file=str(model_path))
        if cache_dir is None:
            model.compile(**options)
            return model
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = _cache_key(model_text, options)
        obj, digest_file = cache_dir / f"{key}.o", cache_dir / f"{key}.sha256"
        if obj.is_file() and digest_file.is_file():
            if hashlib.sha256(obj.read_bytes()).hexdigest() == digest_file.read_text().strip():
                model.compile(cache=str(obj), **options)
                log.info("loaded compiled ranker from cache %s", obj)
                return model
            log.warning("compiled ranker cache %s fails its checksum; recompiling", obj)
        fresh = Path(tmp) / "model.o"
        model.compile(cache=str(fresh), **options)
        data = fresh.read_bytes()
        staged = cache_dir / f"{key}.o.{os.getpid()}.tmp"
        staged.write_bytes(data)
        os.replace(staged, obj)
        digest_file.write_text(hashlib.sha256(data).hexdigest())
        return model


@dataclass
class FastPath:
    """A compiled predictor plus how it was checked; `model` is None when stock predict is used."""

    model: Any = None
    max_abs_diff: float | None = None
    compile_seconds: float | None = None
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.model is not None


def build_fast_path(booster: lgb.Booster, cache_dir: Path | None) -> FastPath:
    """Compile with lleaves and accept it only if it reproduces `Booster.predict` on a threshold probe."""
    start = time.perf_counter()
    try:
        model = compile_lleaves(booster.model_to_string(), cache_dir)
    except Exception as exc:  # any compiler/llvm failure must leave serving on stock predict
        log.warning("ranker fast path unavailable, using stock LightGBM predict: %s", exc)
        return FastPath(reason=f"compile failed: {exc}")
    seconds = time.perf_counter() - start
    probe = threshold_probe(booster)
    stock = booster.predict(probe, num_threads=1)
    fast = compiled_predict(model, probe)
    diff = float(np.max(np.abs(stock - fast)))
    scale = max(1.0, float(np.max(np.abs(stock))))
    if not diff <= FAST_PATH_RTOL * scale:
        log.warning(
            "compiled ranker differs from LightGBM by %.3g (> %.1g x %.3g); using stock predict",
            diff,
            FAST_PATH_RTOL,
            scale,
        )
        return FastPath(max_abs_diff=diff, compile_seconds=seconds, reason="probe mismatch")
    log.info("ranker fast path ready in %.1fs (max |diff| %.2g on %d probe rows)", seconds, diff, len(probe))
    return FastPath(model=model, max_abs_diff=diff, compile_seconds=seconds, reason="verified")


# ------------------------------------------------------------------ the ranker


class Ranker:
    """A lambdarank booster with named features; `predict` is safe to call from many threads."""

    def __init__(
        self, booster: lgb.Booster, feature_names: Sequence[str], meta: dict[str, Any] | None = None
    ) -> None:
        names = list(booster.feature_name())
        if names != list(feature_names):
            raise RankerLoadError(
                f"model features {names} do not match the given feature names {list(feature_names)}"
            )
        self.booster = booster
        self.feature_names = list(feature_names)
        self.meta: dict[str, Any] = dict(meta or {})
        self._fast: FastPath | None = None
        self._fast_lock = threading.Lock()
        self._background: threading.Thread | None = None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # -------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        X_train: Any,
        y_train: Any,
        group_train: Any,
        X_valid: Any | None,
        y_valid: Any | None,
        group_valid: Any | None,
        cfg: RankerConfig | None = None,
        *,
        feature_names: Sequence[str],
    ) -> Ranker:
        """Best-of-`cfg.search_trials` lambdarank model, early-stopped on validation NDCG@`cfg.eval_at`.

        Without a validation set there is nothing to select on: one model with the configured
        parameters is trained for `cfg.num_boost_round` rounds.
        """
        cfg = cfg or RankerConfig()
        names = [str(n) for n in feature_names]
        if len(set(names)) != len(names):
            raise RankerInputError("feature_names must be unique")
        x, y, g = _check_set(X_train, y_train, group_train, "training", len(names))
        train_set = lgb.Dataset(x, y, group=g, feature_name=names, free_raw_data=False)
        has_valid = X_valid is not None and y_valid is not None and group_valid is not None
        base = _base_params(cfg)
        trials = search_trials(cfg) if has_valid else search_trials(cfg)[:1]
        valid_set = None
        if has_valid:
            xv, yv, gv = _check_set(X_valid, y_valid, group_valid, "validation", len(names))
            valid_set = lgb.Dataset(xv, yv, group=gv, reference=train_set, free_raw_data=False)
        metric_name = f"ndcg@{cfg.eval_at}"
        best: tuple[float, lgb.Booster, dict[str, Any]] | None = None
        results = []
        for i, trial in enumerate(trials):
            params = {**base, **trial}
            start = time.perf_counter()
            evals: dict[str, Any] = {}
            callbacks = [lgb.record_evaluation(evals)]
            if valid_set is not None:
                callbacks.append(lgb.early_stopping(cfg.early_stopping_rounds, verbose=False))
            booster = lgb.train(
                params,
                train_set,
                num_boost_round=cfg.num_boost_round,
                valid_sets=[valid_set] if valid_set is not None else None,
                valid_names=["valid"] if valid_set is not None else None,
                callbacks=callbacks,
            )
            score = float(booster.best_score["valid"][metric_name]) if valid_set is not None else float("nan")
            best_iter = booster.best_iteration or booster.current_iteration()
            results.append({**trial, "valid_score": score, "best_iteration": best_iter})
            log.info(
                "ranker trial %d/%d %s: valid %s=%.4f at iteration %d (%.1fs)",
                i + 1,
                len(trials),
                trial,
                metric_name,
                score,
                best_iter,
                time.perf_counter() - start,
            )
            if best is None or score > best[0]:
                best = (score, booster, params)
        assert best is not None
        score, booster, params = best
        best_iter = booster.best_iteration or booster.current_iteration()
        final = lgb.Booster(model_str=booster.model_to_string(num_iteration=best_iter))
        meta = {
            "params": {k: v for k, v in params.items() if k != "eval_at"} | {"eval_at": cfg.eval_at},
            "best_iteration": int(best_iter),
            "valid_metric": metric_name,
            "valid_score": None if np.isnan(score) else score,
            "trials": results,
            "train_rows": len(x),
            "train_groups": len(g),
        }
        return cls(final, names, meta)

    def feature_importance(self) -> dict[str, float]:
        """Total split gain per feature name (the ranker's own view of what matters)."""
        gains = self.booster.feature_importance(importance_type="gain")
        return {name: float(gain) for name, gain in zip(self.feature_names, gains)}

    # ------------------------------------------------------------ prediction

    def enable_fast_path(
        self, cache_dir: str | os.PathLike[str] | None = None, *, cache: bool = True
    ) -> FastPath:
        """Compile and verify the fast path once (later calls return the same result)."""
        with self._fast_lock:
            if self._fast is None:
                folder = (
                    (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if cache else None
                )
                self._fast = build_fast_path(self.booster, folder)
            return self._fast

    def enable_fast_path_in_background(
        self, cache_dir: str | os.PathLike[str] | None = None
    ) -> threading.Thread:
        """Compile in a daemon thread so a (hot) reload is not blocked for a cold compile.

        Until the fast path is verified, `predict` answers with stock predict (same scores).
        """
        with self._fast_lock:
            if self._background is None:
                self._background = threading.Thread(
                    target=self.enable_fast_path, args=(cache_dir,), name="ranker-compile", daemon=True
                )
                self._background.start()
            return self._background

    def disable_fast_path(self) -> None:
        """Use stock `Booster.predict` from now on (the reference the fast path is checked against)."""
        with self._fast_lock:
            self._fast = FastPath(reason="disabled")

    @property
    def fast_path(self) -> FastPath:
        """The current fast path state; compiles it on first use."""
        return self._fast if self._fast is not None else self.enable_fast_path()

    def predict(self, X: Any) -> np.ndarray:
        """Scores float64 [n] for feature rows float32 [n, F]; higher = rank first."""
        x = _check_matrix(X, "ranker features", self.n_features)
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        fast = self._fast
        if fast is None:
            if self._background is not None:
                return self.predict_stock(x)
            fast = self.enable_fast_path()
        if fast.enabled:
            n_jobs = 1 if len(x) < PARALLEL_MIN_ROWS else min(8, os.cpu_count() or 1)
            return compiled_predict(fast.model, x, n_jobs)
        return self.predict_stock(x)

    def predict_stock(self, X: Any) -> np.ndarray:
        """LightGBM's own `Booster.predict` (the reference; thread-safe in LightGBM >= 4)."""
        x = _check_matrix(X, "ranker features", self.n_features)
        return np.asarray(self.booster.predict(x), dtype=np.float64)

    # -------------------------------------------------------------- save/load

    def save(self, directory: str | os.PathLike[str]) -> None:
        """`model.txt` (LightGBM text model, best iteration only) and `meta.json`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (MODEL_FILE + ".tmp")
        tmp.write_text(self.booster.model_to_string())
        os.replace(tmp, out / MODEL_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "lightgbm_version": lgb.__version__,
            "feature_names": self.feature_names,
            **{k: v for k, v in self.meta.items() if k not in ("format_version", "feature_names")},
        }
        tmp_meta = out / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, default=_json_default))
        os.replace(tmp_meta, out / META_FILE)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        expected_feature_names: Sequence[str] | None = None,
        fast_path: bool = True,
        background: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Ranker:
        """Read `save`'s files and (by default) compile + verify the fast path now, not on the first request.

        `background=True` compiles in a thread instead (stock predict until it is ready), for servers
        that must not stall on a cold compile (minutes for 300 trees on a busy 2-core machine).

        RankerLoadError names the missing or corrupt file, or lists how the feature names differ.
        """
        folder = Path(directory)
        model_path, meta_path = folder / MODEL_FILE, folder / META_FILE
        for path in (model_path, meta_path):
            if not path.is_file():
                raise RankerLoadError(f"ranker file missing: {path}")
        try:
            meta = json.loads(meta_path.read_text())
            names = [str(n) for n in meta["feature_names"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise RankerLoadError(f"ranker metadata {meta_path} is corrupt: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise RankerLoadError(
                f"{meta_path} has format_version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}"
            )
        try:
            booster = lgb.Booster(model_file=str(model_path))
        except lgb.basic.LightGBMError as exc:
            raise RankerLoadError(f"ranker model {model_path} is corrupt: {exc}") from exc
        model_names = list(booster.feature_name())
        if model_names != names:
            raise RankerLoadError(
                f"{model_path} has features {_name_diff(model_names, names)} relative to {meta_path}"
            )
        if expected_feature_names is not None and list(expected_feature_names) != names:
            raise RankerLoadError(
                f"ranker in {folder} was trained on different features than this code computes: "
                f"{_name_diff(names, list(expected_feature_names))}"
            )
        ranker = cls(booster, names, {k: v for k, v in meta.items() if k not in ("feature_names",)})
        if fast_path and background:
            ranker.enable_fast_path_in_background(cache_dir)
        elif fast_path:
            ranker.enable_fast_path(cache_dir)
        else:
            ranker.disable_fast_path()
        return ranker


def _name_diff(actual: list[str], expected: list[str]) -> str:
    """A short human description of how two feature-name lists differ."""
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if missing or extra:
        return f"missing {missing}, unexpected {extra}"
    return f"in a different order ({len(actual)} names)"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
