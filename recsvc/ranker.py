"""LightGBM lambdarank ranker with a compiled, verified prediction fast path.

Training: early stopping on validation NDCG@`eval_at` and a small deterministic search over
num_leaves / min_data_in_leaf / learning_rate (the first trial is always the configured values).

Serving: stock `Booster.predict` walks each tree row by row through generic code, paying a
mispredicted branch at most splits. The fast path compiles the model with LLVM (llvmlite, in-process,
no C compiler needed) into branchless SIMD code: each split is one vector compare over LANES rows and
each tree a nested select, so a request's few hundred candidate rows cost a fraction of stock predict
(and of lleaves' branchy per-row code, which this replaced: see benchmarks/bench_ranker.py). Scores
are bit-identical to LightGBM: same comparisons, tree outputs summed in model order. The compiled
object is cached on disk keyed by the model text, the code generator's source and the host CPU, so a
reload skips code generation. The fast path is only used after it reproduced `Booster.predict` on a
probe that hits split thresholds exactly, NaNs and zeros; an unsupported model or any failure falls
back to stock predict.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
from numba.core.compiler_lock import global_compiler_lock

from recsvc.config import RankerConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.txt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
# Equality required of the fast path, relative to the scale of the probe's scores.
FAST_PATH_RTOL = 1e-6
PROBE_ROWS = 512
# LightGBM's predictor drops |value| <= kZeroThreshold as an implicit zero before walking trees;
# the kernel compares raw values, so `kernel_threshold` moves the thresholds that would notice.
K_ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM: `const double kZeroThreshold = 1e-35f`
# Rows scored per SIMD vector (8 doubles: one AVX-512 or two AVX2 registers; LLVM splits as needed).
LANES = 8
# Splits per pass over the rows: ~50 trees of 7 leaves or ~5 of 63 keep the pass's code in the
# instruction cache (bench_ranker: 25/50/100 trees of 7 leaves and 5/10/20 of 63 leaves were timed).
NODES_PER_BLOCK = 320
# LLVM codegen level: 1-3 give the same code speed here, 0 is ~15% slower; no IR passes are run
# (the IR is already straight-line; O2 passes tripled compile time for no speed).
CODEGEN_OPT = 2
# Objectives whose prediction is the raw score (no sigmoid/exp), the only ones the kernel emits.
IDENTITY_OBJECTIVES = frozenset({"lambdarank", "rank_xendcg", "regression"})
# Above this many rows a prediction is split over threads.
PARALLEL_MIN_ROWS = 20_000
SEARCH_GRID: dict[str, tuple[Any, ...]] = {
    "num_leaves": (15, 31, 63, 127),
    "min_data_in_leaf": (20, 50, 100),
    "learning_rate": (0.03, 0.05, 0.1),
}


class RankerInputError(ValueError):
    """Training or prediction arrays with the wrong shape, type or content."""


class UnsupportedModelError(ValueError):
    """A LightGBM model using features the compiled kernel does not implement (served by stock predict)."""


class RankerLoadError(RuntimeError):
    """A saved ranker that cannot be used: missing/corrupt file or feature names that do not match."""


def default_cache_dir() -> Path:
    """Where compiled models are cached: $RECSVC_CACHE_DIR/ranker, else ~/.cache/recsvc/ranker."""
    root = os.environ.get("RECSVC_CACHE_DIR") or Path.home() / ".cache" / "recsvc"
    return Path(root) / "ranker"


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


def _model_sections(model_text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The `key=value` lines of a LightGBM text model: the header's, then one dict per tree."""
    header: dict[str, str] = {}
    trees: list[dict[str, str]] = []
    for line in model_text.splitlines():
        if line.startswith("Tree="):
            trees.append({})
            continue
        if line.startswith("end of trees"):
            break
        key, sep, value = line.partition("=")
        if sep:
            (trees[-1] if trees else header)[key] = value
    return header, trees


def threshold_probe(
    booster: lgb.Booster, n_rows: int = PROBE_ROWS, seed: int = 0, *, model_text: str | None = None
) -> np.ndarray:
    """float32 rows whose values sit exactly on, just below and just above the model's split thresholds.

    Random data rarely lands on a threshold, so it would miss float32/float64 rounding bugs; this
    probe also mixes in NaN, 0 and +-1e-35 (LightGBM's zero threshold) so missing-value routing
    and implicit zeros are compared too. `model_text` is `booster.model_to_string()` when the
    caller already has it (rendering it again costs ~60 ms for 300 trees of 63 leaves).
    """
    n_features = booster.num_feature()
    per_feature: list[list[float]] = [[] for _ in range(n_features)]
    text = booster.model_to_string() if model_text is None else model_text
    for tree in _model_sections(text)[1]:
        for f, t in zip(tree.get("split_feature", "").split(), tree.get("threshold", "").split()):
            per_feature[int(f)].append(float(t))
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


@dataclass(frozen=True)
class Tree:
    """One tree as LightGBM's text model stores it; a child < 0 is leaf `~child`."""

    split_feature: tuple[int, ...]
    threshold: tuple[float, ...]
    decision_type: tuple[int, ...]
    left_child: tuple[int, ...]
    right_child: tuple[int, ...]
    leaf_value: tuple[float, ...]


def parse_forest(model_text: str) -> tuple[int, list[Tree]]:
    """(number of features, trees) of a model the SIMD kernel reproduces exactly.

    UnsupportedModelError for what the kernel does not implement (categorical splits, linear
    trees, several trees per iteration, averaged or transformed outputs), so serving stays on
    stock predict instead of answering differently.
    """
    header, raw_trees = _model_sections(model_text)
    objective = header.get("objective", "").strip()
    if objective not in IDENTITY_OBJECTIVES:
        raise UnsupportedModelError(f"objective {objective!r} transforms raw scores")
    if header.get("num_tree_per_iteration", "1") != "1" or "average_output" in header:
        raise UnsupportedModelError("multi-class or averaged (random forest) model")
    if "max_feature_idx" not in header:
        raise UnsupportedModelError("model text has no max_feature_idx")
    trees = []
    for i, t in enumerate(raw_trees):
        if t.get("num_cat", "0") != "0" or t.get("is_linear", "0") != "0":
            raise UnsupportedModelError(f"tree {i} has categorical splits or linear leaves")

        def ints(key: str, t: dict[str, str] = t) -> tuple[int, ...]:
            return tuple(int(v) for v in t.get(key, "").split())

        def floats(key: str, t: dict[str, str] = t) -> tuple[float, ...]:
            return tuple(float(v) for v in t.get(key, "").split())

        trees.append(
            Tree(
                ints("split_feature"),
                floats("threshold"),
                ints("decision_type"),
                ints("left_child"),
                ints("right_child"),
                floats("leaf_value"),
            )
        )
        if len(trees[-1].leaf_value) != len(trees[-1].split_feature) + 1:
            raise UnsupportedModelError(f"tree {i} has inconsistent node and leaf counts")
    return int(header["max_feature_idx"]) + 1, trees


def kernel_threshold(threshold: float) -> float:
    """The threshold that gives LightGBM's decision on the raw input value.

    LightGBM reads |x| <= kZeroThreshold as 0 before walking trees. That only changes a decision
    `x <= t` when t lies in [-kZ, kZ) (LightGBM puts its splits around zero exactly there); moving
    such t to just below -kZ or to kZ makes the raw comparison give the zeroed answer, so the kernel
    needs no zeroing pass over the input.
    """
    if -K_ZERO_THRESHOLD <= threshold < 0.0:
        return float(np.nextafter(-K_ZERO_THRESHOLD, -np.inf))
    if 0.0 <= threshold < K_ZERO_THRESHOLD:
        return K_ZERO_THRESHOLD
    return threshold


def float32_at_most(value: float) -> float:
    """The largest float32 <= `value` (-inf below float32's range).

    For every float32 x (infinities included), `x <= value` exactly when `x <= float32_at_most(value)`,
    so float32 rows are compared in float32 (twice the lanes per instruction) with LightGBM's
    double-precision answers.
    """
    with np.errstate(over="ignore"):  # beyond float32's range rounds to +-inf, then down from +inf
        rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def _goes_left(b: Any, x: Any, split: Split, constant: Any) -> Any:
    """LightGBM's NumericalDecision for SIMD lanes of raw values `x`, as one or two compares.

    Unordered compares (`ule`) are true for NaN, ordered ones (`ole`) false, which encodes where a
    NaN goes: missing type NaN sends it to the default side; None reads it as 0 (so it goes left
    iff 0 <= t); Zero sends NaN and |x| <= kZ to the default side. `constant(v)` is v as a
    comparison vector in x's type (`_VectorBlock.bound`, not the double `splat`).
    """
    t = kernel_threshold(split.threshold)
    default_left = bool(split.decision_type & 2)
    bound = constant(t)
    if split.missing_type == 0:
        nan_left = t >= 0.0
    elif split.missing_type == 2:
        nan_left = default_left
    else:
        tiny = b.and_(
            b.fcmp_ordered(">=", x, constant(-K_ZERO_THRESHOLD)),
            b.fcmp_ordered("<=", x, constant(K_ZERO_THRESHOLD)),
        )
        if default_left:
            le = b.fcmp_unordered("<=", x, bound)
            return le if t >= K_ZERO_THRESHOLD else b.or_(le, tiny)
        le = b.fcmp_ordered("<=", x, bound)
        return le if t < -K_ZERO_THRESHOLD else b.and_(le, b.not_(tiny))
    return b.fcmp_unordered("<=", x, bound) if nan_left else b.fcmp_ordered("<=", x, bound)


class _VectorBlock:
    """IR for one row vector inside one tree block: feature columns loaded once, trees as selects.

    Columns keep the input's type: float32 rows are compared in float32 against thresholds rounded
    down by `float32_at_most` (same decisions, half the vector width); leaf values are doubles.
    """

    def __init__(self, ir: Any, builder: Any, x: Any, rows: list[Any], n_features: int) -> None:
        self.ir, self.b, self.x = ir, builder, x
        self.f64 = ir.DoubleType()
        self.vec = ir.VectorType(self.f64, LANES)
        self.single = x.type.pointee == ir.FloatType()
        self.column_vec = ir.VectorType(x.type.pointee, LANES)
        self.offsets = [builder.mul(row, ir.Constant(ir.IntType(64), n_features)) for row in rows]
        self.columns: dict[int, Any] = {}

    def splat(self, value: float) -> Any:
        """A vector of doubles (leaf values, running totals)."""
        return self.ir.Constant(self.vec, [self.ir.Constant(self.f64, value)] * LANES)

    def bound(self, value: float) -> Any:
        """A comparison constant in the columns' type, giving the double comparison's answers."""
        if self.single:
            value = float32_at_most(value)
        return self.ir.Constant(self.column_vec, [self.ir.Constant(self.column_vec.element, value)] * LANES)

    def column(self, feature: int) -> Any:
        """Feature `feature` of the LANES rows, in the input's type."""
        if feature not in self.columns:
            ir, b = self.ir, self.b
            lanes = ir.Constant(self.column_vec, ir.Undefined)
            for lane, offset in enumerate(self.offsets):
                value = b.load(b.gep(self.x, [b.add(offset, ir.Constant(ir.IntType(64), feature))]))
                lanes = b.insert_element(lanes, value, ir.Constant(ir.IntType(32), lane))
            self.columns[feature] = lanes
        return self.columns[feature]

    def tree(self, tree: Tree, node: int = 0) -> Any:
        """The leaf value each lane reaches from `node` (a negative node is leaf ~node)."""
        if node < 0 or not tree.split_feature:
            return self.splat(tree.leaf_value[~node if node < 0 else 0])
        split = Split(tree.split_feature[node], tree.threshold[node], tree.decision_type[node])
        left = _goes_left(self.b, self.column(split.feature), split, self.bound)
        return self.b.select(
            left, self.tree(tree, tree.left_child[node]), self.tree(tree, tree.right_child[node])
        )


def forest_ir(trees: Sequence[Tree], n_features: int) -> str:
    """LLVM IR of `forest_f32(x, out, n)` and `forest_f64(x, out, n)`: raw scores of n row-major rows.

    Branchless: every split of a tree is compared for LANES rows at once (in float32 for float32
    rows) and the leaf is picked by a nested select, so no branch is mispredicted and each
    instruction scores LANES rows. Tree outputs
    are added in model order starting from 0.0, as LightGBM does, so scores are bit-identical.
    Trees are evaluated in blocks of about NODES_PER_BLOCK splits over all rows (the block's code
    stays in the instruction cache); `out` needs room for n rounded up to LANES.
    """
    import llvmlite.binding as llvm
    import llvmlite.ir as ir

    f64, i64 = ir.DoubleType(), ir.IntType(64)
    vec = ir.VectorType(f64, LANES)
    module = ir.Module(name="recsvc_forest")
    module.triple = llvm.get_process_triple()
    mean_splits = max(1.0, sum(len(t.split_feature) for t in trees) / max(1, len(trees)))
    per_block = max(1, round(NODES_PER_BLOCK / mean_splits))
    blocks = [trees[i : i + per_block] for i in range(0, len(trees), per_block)] or [[]]
    for name, elem in (("forest_f32", ir.FloatType()), ("forest_f64", f64)):
        signature = ir.FunctionType(ir.VoidType(), (elem.as_pointer(), f64.as_pointer(), i64))
        fn = ir.Function(module, signature, name)
        x, out, n = fn.args
        entry = fn.append_basic_block("entry")
        b = ir.IRBuilder(entry)
        n_vectors = b.udiv(b.add(n, ir.Constant(i64, LANES - 1)), ir.Constant(i64, LANES))
        last_row = b.sub(n, ir.Constant(i64, 1))
        heads = [fn.append_basic_block(f"block{k}.head") for k in range(len(blocks))]
        done = fn.append_basic_block("done")
        ir.IRBuilder(done).ret_void()
        b.branch(heads[0])
        for k, block in enumerate(blocks):
            head = ir.IRBuilder(heads[k])
            body_block = fn.append_basic_block(f"block{k}.body")
            v = head.phi(i64, name="v")
            v.add_incoming(ir.Constant(i64, 0), entry if k == 0 else heads[k - 1])
            after = heads[k + 1] if k + 1 < len(blocks) else done
            head.cbranch(head.icmp_unsigned("<", v, n_vectors), body_block, after)
            body = ir.IRBuilder(body_block)
            first = body.mul(v, ir.Constant(i64, LANES))
            rows = []
            for lane in range(LANES):  # lanes past the last row re-read it; their scores are padding
                row = body.add(first, ir.Constant(i64, lane))
                rows.append(body.select(body.icmp_unsigned("<", row, n), row, last_row))
            code = _VectorBlock(ir, body, x, rows, n_features)
            target = body.bitcast(body.gep(out, [first]), vec.as_pointer())
            total = code.splat(0.0) if k == 0 else body.load(target, align=8)
            for tree in block:
                total = body.fadd(total, code.tree(tree))
            body.store(total, target, align=8)
            v.add_incoming(body.add(v, ir.Constant(i64, 1)), body_block)
            body.branch(heads[k])
    return str(module)


# llvmlite's global LLVM context is not safe for concurrent compiles, and numba (the feature
# kernels) compiles through the same llvmlite in this process: share numba's compiler lock.
_LLVM_LOCK = global_compiler_lock
_llvm_initialised = False
# The code generator's identity in the cache key: this module's source as imported, so a process
# still running old code never files its objects under the key of a newer source on disk.
_GENERATOR_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _target_machine() -> tuple[Any, str]:
    """The host's LLVM target machine and a description of it for the cache key (call under the lock)."""
    global _llvm_initialised
    import llvmlite.binding as llvm

    if not _llvm_initialised:
        with contextlib.suppress(RuntimeError):  # llvmlite >= 0.45 initialises itself and raises here
            llvm.initialize()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _llvm_initialised = True
    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # LLVM cannot detect features on some hosts
        features = ""
    cpu = llvm.get_host_cpu_name()
    # The large code model: MCJIT places code and constant sections wherever mmap puts them, and
    # the small model's 32-bit PC-relative references to the constant pool overflow when those land
    # more than 2 GB apart (an intermittent segfault on the first call, seen ~1 load in 3 with torch
    # and faiss loaded). lleaves defaults to the large model for the same reason.
    machine = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        cpu=cpu, features=features, opt=CODEGEN_OPT, reloc="pic", codemodel="large"
    )
    return machine, f"{llvm.get_process_triple()} {cpu} {features} opt{CODEGEN_OPT}"


class CompiledForest:
    """Native scorer of one LightGBM model: rows [n, F] -> float64 [n], equal to `Booster.predict`.

    Stateless apart from the code, so any number of threads may call `predict` at once (the ctypes
    call releases the GIL; each call allocates its own output).
    """

    _SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

    def __init__(self, engine: Any, n_features: int) -> None:
        self._engine = engine  # owns the machine code; must live as long as the function pointers
        self.n_features = n_features
        self._f32 = self._SIGNATURE(engine.get_function_address("forest_f32"))
        self._f64 = self._SIGNATURE(engine.get_function_address("forest_f64"))

    def predict(self, x: np.ndarray, n_threads: int = 1) -> np.ndarray:
        """Scores of rows `x` (any numeric dtype, read as LightGBM reads it), split over `n_threads`."""
        x = np.asarray(x)
        # LightGBM keeps float32/float64 input and reads every other dtype as float32.
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float32
        rows = np.ascontiguousarray(x, dtype=dtype)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise RankerInputError(f"compiled ranker expects [rows, {self.n_features}], got {rows.shape}")
        n = len(rows)
        out = np.empty(-(-max(n, 1) // LANES) * LANES, dtype=np.float64)
        kernel = self._f32 if dtype == np.float32 else self._f64
        if n_threads <= 1 or n < 2 * LANES * n_threads:
            if n:
                kernel(rows.ctypes.data, out.ctypes.data, n)
            return out[:n]
        # Chunks start on multiples of LANES so one chunk's padding never overlaps the next chunk.
        step = -(-n // (n_threads * LANES)) * LANES
        with concurrent.futures.ThreadPoolExecutor(max_workers=n_threads) as pool:
            jobs = [
                pool.submit(
                    kernel,
                    rows[start:].ctypes.data,
                    out[start:].ctypes.data,
                    min(step, n - start),
                )
                for start in range(0, n, step)
            ]
            for job in jobs:
                job.result()
        return out[:n]


def _model_width(model_text: str) -> int:
    """Number of features, read from the model header alone (the trees are not parsed)."""
    header, _ = _model_sections(model_text.partition("\nTree=")[0])
    return int(header["max_feature_idx"]) + 1


def _read_cached_object(cache_dir: Path, key: str) -> bytes | None:
    """The object filed under `key` if its checksum holds (a missing cache folder is a miss)."""
    obj, digest_file = cache_dir / f"{key}.o", cache_dir / f"{key}.sha256"
    if not (obj.is_file() and digest_file.is_file()):
        return None
    data = obj.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest_file.read_text().strip():
        log.warning("compiled ranker cache %s fails its checksum; recompiling", obj)
        return None
    log.info("loaded compiled ranker from cache %s", obj)
    return data


def _write_cached_object(cache_dir: Path, key: str, data: bytes) -> None:
    """File `data` under `key` atomically, then its checksum (readers need both)."""
    obj = cache_dir / f"{key}.o"
    staged = obj.with_name(f"{obj.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    staged.write_bytes(data)
    os.replace(staged, obj)
    (cache_dir / f"{key}.sha256").write_text(hashlib.sha256(data).hexdigest())


def compile_forest(model_text: str, cache_dir: Path | None) -> CompiledForest:
    """Compile `forest_ir` for this CPU, reusing a checksummed object from `cache_dir` when present.

    The cache key is the model text, this module's source (the code generator) and the target, so
    a changed model or generator compiles afresh while a cache hit skips parsing the trees and
    generating the IR (seconds for 300 trees of 63 leaves): only a model `parse_forest` accepted
    was ever filed under its key.
    """
    import llvmlite
    import llvmlite.binding as llvm

    with _LLVM_LOCK:  # llvmlite's global context is not safe for concurrent compiles
        machine, target = _target_machine()
        key = hashlib.sha256(
            f"{_GENERATOR_DIGEST}\n{llvmlite.__version__}\n{target}\n{model_text}".encode()
        ).hexdigest()
        cached = _read_cached_object(cache_dir, key) if cache_dir is not None else None
        if cached is not None:
            engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), machine)
            engine.set_object_cache(getbuffer_func=lambda _module: cached)
            engine.finalize_object()
            return CompiledForest(engine, _model_width(model_text))
        n_features, trees = parse_forest(model_text)
        if cache_dir is not None:  # an unusable cache folder fails here, before the long compile
            cache_dir.mkdir(parents=True, exist_ok=True)
        module = llvm.parse_assembly(forest_ir(trees, n_features))
        module.verify()
        emitted: list[bytes] = []
        engine = llvm.create_mcjit_compiler(module, machine)
        engine.set_object_cache(notify_func=lambda _module, buffer: emitted.append(bytes(buffer)))
        engine.finalize_object()
    if cache_dir is not None and emitted:
        _write_cached_object(cache_dir, key, emitted[0])
    return CompiledForest(engine, n_features)


@dataclass
class FastPath:
    """A compiled predictor plus how it was checked; `model` is None when stock predict is used."""

    model: CompiledForest | None = None
    max_abs_diff: float | None = None
    compile_seconds: float | None = None
    reason: str = ""

    @property
    def enabled(self) -> bool:
        return self.model is not None

    @property
    def bit_identical(self) -> bool:
        """Whether the verified kernel reproduced the probe's scores exactly (by construction it
        does; False means a kernel bug worth reporting, though within FAST_PATH_RTOL)."""
        return self.enabled and self.max_abs_diff == 0.0


def build_fast_path(booster: lgb.Booster, cache_dir: Path | None) -> FastPath:
    """Compile the SIMD kernel and accept it only if it reproduces `Booster.predict` on a threshold probe.

    The acceptance bar is FAST_PATH_RTOL; `FastPath.bit_identical` says whether the probe scores
    were exactly equal.
    """
    start = time.perf_counter()
    model_text = booster.model_to_string()
    try:
        model = compile_forest(model_text, cache_dir)
    except UnsupportedModelError as exc:
        log.info("ranker fast path not used (%s); using stock LightGBM predict", exc)
        return FastPath(reason=f"unsupported model: {exc}")
    except Exception as exc:  # any compiler/llvm failure must leave serving on stock predict
        log.warning("ranker fast path unavailable, using stock LightGBM predict: %s", exc)
        return FastPath(reason=f"compile failed: {exc}")
    seconds = time.perf_counter() - start
    probe = threshold_probe(booster, model_text=model_text)
    stock = booster.predict(probe, num_threads=1)
    fast = model.predict(probe)
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

    def enable_fast_path(self, cache_dir: str | os.PathLike[str] | None = None) -> FastPath:
        """Compile and verify the fast path once (later calls return the same result)."""
        with self._fast_lock:
            if self._fast is None:
                folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
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
            n_threads = 1 if len(x) < PARALLEL_MIN_ROWS else min(8, os.cpu_count() or 1)
            return fast.model.predict(x, n_threads)
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
