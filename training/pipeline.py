"""The offline pipeline behind `recsvc-train`: data -> encoder -> index -> ranker -> evaluation -> bundle.

Stages run in order and cache their outputs under a work directory, each with a fingerprint of
its inputs (upstream fingerprints + the config sections it reads), so re-running after a failure
redoes only the stages whose inputs changed, and any single stage can be run on its own.

Time windows follow docs/ARCHITECTURE.md: T = test cutoff (end of data in production mode),
T1 = T - valid_days, T2 = T1 - valid_days. The encoder learns from data < T2, the ranker is
trained on labels in [T2, T1) with features from < T2 and validated on [T1, T), and the published
serving state holds everything < T. Test metrics come from what users did at >= T.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from recsvc import bundle
from recsvc.config import DAY, TrainConfig, to_dict
from training import report
from training.data import DataValidationError, load_dataset
from training.split import data_end, holdout_cutoff

log = logging.getLogger(__name__)

STAGES = ("load", "split", "finetune", "embed", "index", "state", "ranker", "evaluate", "publish")
# Upstream stages and the TrainConfig sections each stage reads: together they decide when a
# cached output is still valid.
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "load": ((), ("data",)),
    "split": (("load",), ("split",)),
    "finetune": (("split",), ("text", "encoder")),
    "embed": (("finetune",), ("text", "encoder")),
    "index": (("embed",), ("index",)),
    "state": (("split",), ("text", "candidates", "collaborative")),
    "ranker": (("index", "state"), ("candidates", "collaborative", "ranker")),
    "evaluate": (("ranker",), ("text", "candidates", "baselines", "eval")),
    "publish": (("ranker", "evaluate"), ()),
}
STAGE_FILE = "stage.json"


class PipelineError(Exception):
    """The pipeline cannot run as asked (missing cached inputs, bad stage name, too little data)."""


@dataclass
class TrainResult:
    """What a run produced: the published version (None when no publish ran), metrics, timings."""

    version: str | None
    metrics: dict[str, Any]
    timings: dict[str, dict[str, float]]
    bundle_path: Path | None = None


@dataclass(frozen=True)
class Windows:
    """The leak-free time windows of one run (epoch seconds)."""

    T: int  # test cutoff (production: end of data + 1 s)
    T1: int  # ranker validation labels [T1, T)
    T2: int  # encoder data < T2; ranker training labels [T2, T1)
    data_start: int
    data_end: int  # newest interaction timestamp
    evaluate: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Windows:
        return cls(**data)


def compute_windows(first_ts: int, last_ts: int, test_cutoff: int | None, valid_days: float) -> Windows:
    """T from the test split (or just after the last event when `test_cutoff` is None), then T1, T2."""
    evaluate = test_cutoff is not None
    T = int(test_cutoff) if test_cutoff is not None else int(last_ts) + 1
    step = round(valid_days * DAY)
    T1, T2 = T - step, T - 2 * step
    if first_ts >= T2:
        span = (last_ts - first_ts) / DAY
        raise PipelineError(
            f"the data spans {span:.2f} days, too short for the time windows: need more than "
            f"{2 * valid_days:g} days of training data before the {'test cutoff' if evaluate else 'end of data'} "
            f"(split.valid_days={valid_days:g}); lower split.valid_days/split.test_days or supply more history"
        )
    return Windows(T=T, T1=T1, T2=T2, data_start=int(first_ts), data_end=int(last_ts), evaluate=evaluate)


# ----------------------------------------------------------------------------- resources


def _read_status_kb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux) so each stage reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM) or, failing that, of the process."""
    kb = _read_status_kb("VmHWM")
    if kb is None:
        kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return kb / 1024.0


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): comparable across busy and idle hosts."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def measure(stage: str, timings: dict[str, dict[str, float]]) -> Iterator[None]:
    """Record a stage's wall time, CPU time and peak RSS into `timings` and the log."""
    _reset_peak_rss()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    log.info("stage %s: started", stage)
    try:
        yield
    finally:
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        timings[stage] = {
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        log.info(
            "stage %s: %.1f s wall, %.1f s CPU, peak RSS %.0f MB",
            stage,
            wall,
            cpu,
            timings[stage]["peak_rss_mb"],
        )


# ----------------------------------------------------------------------------- fingerprints


def data_fingerprint(data_dir: Path) -> str:
    """Cheap identity of the input files (name, size, mtime), so edits invalidate the cache."""
    parts = []
    for path in sorted(data_dir.iterdir()):
        if path.is_file() and path.stem in ("interactions", "items"):
            st = path.stat()
            parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_fingerprints(
    cfg: TrainConfig, data_fp: str, evaluate: bool, extra: dict[str, Any]
) -> dict[str, str]:
    """One fingerprint per stage from its config sections and its upstream fingerprints."""
    cfg_dict = to_dict(cfg)
    out: dict[str, str] = {}
    for stage in STAGES:
        upstream, sections = STAGE_INPUTS[stage]
        payload = {
            "stage": stage,
            "upstream": [out[u] for u in upstream],
            "config": {s: cfg_dict.get(s) for s in sections},
        }
        if stage == "load":
            payload["data"] = data_fp
        if stage == "split":
            payload["evaluate"] = evaluate
            payload["catalogue"] = extra.get("catalogue")
        if stage == "finetune":
            payload["validation"] = extra.get("finetune_validation")
        if stage in ("finetune", "embed", "index"):
            payload["device"] = extra.get("device")
        out[stage] = _digest(payload)
    return out


def run_fingerprints(run_cfg: TrainConfig, budget: Budget, data_fp: str, evaluate: bool) -> dict[str, str]:
    """Stage fingerprints of a run: budgeted config plus the budget facts no section holds."""
    p = run_cfg.pipeline
    extra = {
        "device": budget.device,
        "catalogue": {
            "max_items": budget.max_catalogue_items,
            "half_life": p.catalogue_half_life_days,
            "seed": p.seed,
        },
        "finetune_validation": budget.finetune_validation,
    }
    return stage_fingerprints(run_cfg, data_fp, evaluate, extra)


# ----------------------------------------------------------------------------- work directory


class WorkDir:
    """Per-stage output folders with a `stage.json` marker naming the inputs they came from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def is_done(self, stage: str, fingerprint: str) -> bool:
        marker = self.stage_dir(stage) / STAGE_FILE
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            return False

    def begin(self, stage: str) -> Path:
        """A clean folder for a stage about to run (stale outputs removed)."""
        path = self.stage_dir(stage)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def finish(self, stage: str, fingerprint: str, timing: dict[str, float]) -> None:
        marker = self.stage_dir(stage) / STAGE_FILE
        marker.write_text(json.dumps({"fingerprint": fingerprint, **timing}, indent=2))

    def require(self, stage: str, needed_by: str) -> Path:
        """Folder of a finished upstream stage, or a PipelineError saying what to run first."""
        path = self.stage_dir(stage)
        if not (path / STAGE_FILE).is_file():
            raise PipelineError(
                f"stage '{needed_by}' needs the outputs of stage '{stage}', which are not in {self.root}; "
                f"run the full pipeline (or --stage {stage}) with this --work-dir first"
            )
        return path

    def timing(self, stage: str) -> dict[str, float] | None:
        marker = self.stage_dir(stage) / STAGE_FILE
        if not marker.is_file():
            return None
        data = json.loads(marker.read_text())
        return {k: data[k] for k in ("wall_s", "peak_rss_mb") if k in data}


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=bundle._json_default) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """Caps actually applied to this run (recorded in the manifest so results are explainable)."""

    device: str
    max_catalogue_items: int | None
    max_finetune_steps: int | None
    finetune_trainable_layers: int | None  # top BERT layers trained (None = all)
    max_tokens: int
    eval_max_users: int | None
    finetune_validation: bool
    ranker_max_train_users: int
    ranker_search_trials: int


def _min_optional(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def resolve_device(device: str | None) -> str:
    """'cpu' or 'cuda': `auto`/None picks CUDA when torch sees one."""
    if device in ("cpu", "cuda"):
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise PipelineError("--device cuda was asked for but torch sees no CUDA device")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_budget(cfg: TrainConfig, device: str) -> Budget:
    """The pipeline's budget logic: general caps always, `cpu_*` caps only without CUDA."""
    p = cfg.pipeline
    cpu = device == "cpu"
    return Budget(
        device=device,
        max_catalogue_items=_min_optional(p.max_catalogue_items, p.cpu_max_catalogue_items if cpu else None),
        max_finetune_steps=_min_optional(cfg.encoder.max_steps, p.cpu_max_finetune_steps if cpu else None),
        finetune_trainable_layers=_min_optional(
            cfg.encoder.trainable_layers, p.cpu_trainable_layers if cpu else None
        ),
        max_tokens=min(cfg.text.max_tokens, p.cpu_max_tokens)
        if cpu and p.cpu_max_tokens
        else cfg.text.max_tokens,
        eval_max_users=_min_optional(cfg.eval.max_users, p.cpu_eval_max_users if cpu else None),
        finetune_validation=p.cpu_finetune_validation if cpu else True,
        ranker_max_train_users=_min_optional(
            cfg.ranker.max_train_users, p.cpu_ranker_max_train_users if cpu else None
        ),  # type: ignore[arg-type]
        ranker_search_trials=_min_optional(
            cfg.ranker.search_trials, p.cpu_ranker_search_trials if cpu else None
        ),  # type: ignore[arg-type]
    )


def budgeted_config(cfg: TrainConfig, budget: Budget) -> TrainConfig:
    """`cfg` with the budget's caps written into the sections that read them."""
    return replace(
        cfg,
        encoder=replace(
            cfg.encoder,
            max_steps=budget.max_finetune_steps,
            trainable_layers=budget.finetune_trainable_layers,
        ),
        text=replace(cfg.text, max_tokens=budget.max_tokens),
        eval=replace(cfg.eval, max_users=budget.eval_max_users),
        ranker=replace(
            cfg.ranker,
            max_train_users=budget.ranker_max_train_users,
            search_trials=budget.ranker_search_trials,
        ),
    )


def select_catalogue(
    items: pl.DataFrame,
    history: pl.DataFrame,
    max_items: int | None,
    seed: int,
    half_life_days: float = 2.0,
) -> pl.DataFrame:
    """Items to embed and serve: all of them, or (capped) the items with the highest
    recency-weighted interaction count before T, then a seeded sample of never-seen items.
    Uses only data before T (`history`), so the choice leaks nothing. Catalogue order is kept."""
    if max_items is None or items.height <= max_items:
        return items
    now = int(history["timestamp"].max()) if history.height else 0  # type: ignore[arg-type]
    decay = (0.5 ** ((now - pl.col("timestamp")) / (half_life_days * DAY))).alias("activity")
    activity = history.group_by("item_id").agg(decay.sum())
    ranked = items.select("item_id").with_row_index("row").join(activity, on="item_id", how="left")
    active = ranked.filter(pl.col("activity").is_not_null()).sort(
        ["activity", "row"], descending=[True, False]
    )
    keep = active["row"].head(max_items).to_numpy()
    room = max_items - len(keep)
    if room > 0:
        unseen = ranked.filter(pl.col("activity").is_null())["row"].to_numpy()
        rng = np.random.default_rng(seed)
        keep = np.concatenate([keep, rng.choice(unseen, size=min(room, len(unseen)), replace=False)])
    return items[np.sort(keep).tolist()]


# ----------------------------------------------------------------------------- evaluation helpers


class RecommenderSystem:
    """The full pipeline behind the evaluation protocol, answered by `Recommender.recommend_many`
    (the serving request path), so offline metrics measure exactly what is served."""

    name = "full_pipeline"

    def __init__(self, recommender: Any, batch_size: int = 256, progress: bool = False) -> None:
        self.recommender = recommender
        self.batch_size = batch_size
        self.progress = progress

    def fit(self, train: pl.DataFrame, items: pl.DataFrame) -> None:
        """Nothing to fit: the bundle was trained by the pipeline on the same train window."""

    def recommend(self, user_ids: list[str], k: int, exclude_seen: bool) -> pl.DataFrame:
        from recsvc.recommender import RecommendRequest

        policy = "exclude" if exclude_seen else "allow"
        users: list[str] = []
        items: list[str] = []
        ranks: list[int] = []
        scores: list[float] = []
        sources: list[str] = []
        batches = range(0, len(user_ids), self.batch_size)
        for start in tqdm(batches, desc=f"{self.name} k={k}", unit="batch", disable=not self.progress):
            chunk = user_ids[start : start + self.batch_size]
            reqs = [RecommendRequest(user_id=u, k=k, repeat_policy=policy) for u in chunk]
            for user, result in zip(chunk, self.recommender.recommend_many(reqs)):
                for rank, item in enumerate(result.items, start=1):
                    users.append(user)
                    items.append(item.item_id)
                    ranks.append(rank)
                    scores.append(float(item.score))
                    sources.append(",".join(item.sources))
        return pl.DataFrame(
            {"user_id": users, "item_id": items, "rank": ranks, "score": scores, "sources": sources},
            schema={
                "user_id": pl.Utf8,
                "item_id": pl.Utf8,
                "rank": pl.Int32,
                "score": pl.Float32,
                "sources": pl.Utf8,
            },
        )


def summarise_evaluation(table: Any, ks: Sequence[int]) -> dict[str, Any]:
    """evaluate.EvaluationTable -> the report's shape (final / retrieval / cold_start)."""
    final: dict[str, dict[str, dict[str, float]]] = {}
    retrieval: dict[str, dict[str, float]] = {}
    cold: dict[str, float] = {}
    top = max(ks)
    for result in table.results:
        name = result["system"]
        for mode, entry in result["modes"].items():
            final.setdefault(mode, {})[name] = {
                key: _none_if_nan(value) for key, value in entry["metrics"].items()
            }
        all_metrics = result["modes"].get("all", {}).get("metrics", {})
        if name in ENCODER_SYSTEMS:
            retrieval[name] = {
                f"recall@{k}": _none_if_nan(all_metrics.get(f"recall@{k}")) for k in ks if k >= 50
            }
        if f"cold_recall@{top}" in all_metrics:
            cold[name] = _none_if_nan(all_metrics[f"cold_recall@{top}"])
    return {"final": final, "retrieval": retrieval, "cold_start": cold}


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


ENCODER_SYSTEMS = ("raw_encoder", "finetuned_encoder")
BASELINE_SYSTEMS = ("popularity", "repeat_pop", "itemknn", "als")


# ----------------------------------------------------------------------------- orchestration


@dataclass
class RunContext:
    """Inputs of one run plus in-memory copies of stage outputs (read lazily from the work dir)."""

    data_dir: Path
    bundles_root: Path
    cfg: TrainConfig  # with the budget applied
    budget: Budget
    evaluate: bool
    work: WorkDir
    progress: bool
    fingerprints: dict[str, str]
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def run_training(
    data_dir: str | Path,
    bundles_root: str | Path,
    cfg: TrainConfig | None = None,
    *,
    evaluate: bool = True,
    stages: Sequence[str] | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    device: str | None = "auto",
) -> TrainResult:
    """Run the pipeline (all stages, or just `stages`, which then need `work_dir` caches).

    Without `work_dir` a temporary one is made inside `bundles_root` and removed afterwards. With
    it, stages whose fingerprint matches a cached run are skipped, so a failed run resumes.
    """
    cfg = cfg or TrainConfig()
    data_path = Path(data_dir)
    root = Path(bundles_root)
    if stages is not None:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise PipelineError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(STAGES)}")
        if work_dir is None:
            raise PipelineError("running single stages needs a work_dir holding the earlier stages' outputs")
        if not evaluate and "evaluate" in stages:
            raise PipelineError("stage 'evaluate' cannot run in production mode (--no-eval)")
    if not data_path.is_dir() and (stages is None or "load" in stages):
        raise DataValidationError(f"data folder {data_path} does not exist or is not a directory")
    if not evaluate and stages is None:
        log.info("production mode: no test period, T = end of data; evaluation against baselines skipped")

    budget = plan_budget(cfg, resolve_device(device))
    run_cfg = budgeted_config(cfg, budget)
    log.info("budget: %s", budget)
    root.mkdir(parents=True, exist_ok=True)
    temporary = work_dir is None
    work_root = bundle.new_staging_dir(root) if temporary else Path(work_dir)  # type: ignore[arg-type]
    work = WorkDir(work_root)
    data_fp = data_fingerprint(data_path) if data_path.is_dir() else "absent"
    fps = run_fingerprints(run_cfg, budget, data_fp, evaluate)
    ctx = RunContext(data_path, root, run_cfg, budget, evaluate, work, progress, fps)

    selected = list(stages) if stages is not None else [s for s in STAGES if evaluate or s != "evaluate"]
    version: str | None = None
    try:
        for stage in selected:
            if stages is None and work.is_done(stage, fps[stage]):
                ctx.timings[stage] = {**(work.timing(stage) or {}), "cached": True}
                log.info("stage %s: reusing cached outputs in %s", stage, work.stage_dir(stage))
                continue
            out_dir = work.begin(stage)
            with measure(stage, ctx.timings):
                result = STAGE_FUNCTIONS[stage](ctx, out_dir)
            work.finish(stage, fps[stage], ctx.timings[stage])
            if stage == "publish":
                version = result
        metrics = collected_metrics(ctx)
    finally:
        if temporary:
            shutil.rmtree(work_root, ignore_errors=True)
    return TrainResult(
        version=version,
        metrics=metrics,
        timings=ctx.timings,
        bundle_path=(root / version) if version else None,
    )


# ----------------------------------------------------------------------------- stage inputs


def _dataset(ctx: RunContext) -> tuple[pl.DataFrame, pl.DataFrame]:
    def read() -> tuple[pl.DataFrame, pl.DataFrame]:
        d = ctx.work.require("load", "split")
        return pl.read_parquet(d / "interactions.parquet"), pl.read_parquet(d / "items.parquet")

    return ctx.cached("dataset", read)


def _windows(ctx: RunContext, needed_by: str) -> Windows:
    return ctx.cached(
        "windows", lambda: Windows.from_dict(read_json(ctx.work.require("split", needed_by) / "windows.json"))
    )


def _served_items(ctx: RunContext, needed_by: str) -> pl.DataFrame:
    return ctx.cached(
        "served_items", lambda: pl.read_parquet(ctx.work.require("split", needed_by) / "served_items.parquet")
    )


def _before(frame: pl.DataFrame, cutoff: int) -> pl.DataFrame:
    return frame.filter(pl.col("timestamp") < cutoff)


def _between(frame: pl.DataFrame, start: int, end: int) -> pl.DataFrame:
    ts = pl.col("timestamp")
    return frame.filter((ts >= start) & (ts < end))


def _catalog(ctx: RunContext, needed_by: str) -> Any:
    from recsvc.catalog import Catalog

    return ctx.cached(
        "catalog", lambda: Catalog.load(ctx.work.require("state", needed_by) / "catalog.parquet")
    )


def _item_embeddings(ctx: RunContext, needed_by: str) -> np.ndarray:
    return ctx.cached(
        "item_embeddings", lambda: np.load(ctx.work.require("embed", needed_by) / "item_embeddings.npy")
    )


def _index(ctx: RunContext, needed_by: str) -> Any:
    from recsvc.retrieval import ItemIndex

    return ctx.cached("index", lambda: ItemIndex.load(ctx.work.require("index", needed_by)))


def _tower(ctx: RunContext, needed_by: str) -> Any:
    from recsvc.user_tower import load_params

    return ctx.cached(
        "tower", lambda: load_params(ctx.work.require("finetune", needed_by) / "user_tower.npz")
    )


# ----------------------------------------------------------------------------- stages


def stage_load(ctx: RunContext, out: Path) -> None:
    """Read and validate the data folder; cache the canonical tables."""
    ds = load_dataset(ctx.data_dir, ctx.cfg.data)
    if ds.interactions.height == 0:
        raise DataValidationError(f"no usable interactions in {ctx.data_dir}: {ds.report.summary()}")
    ds.interactions.write_parquet(out / "interactions.parquet")
    ds.items.write_parquet(out / "items.parquet")
    write_json(out / "report.json", {**asdict(ds.report), "summary": ds.report.summary()})
    ctx.memo["dataset"] = (ds.interactions, ds.items)


def stage_split(ctx: RunContext, out: Path) -> None:
    """Time windows (T, T1, T2) and the catalogue to embed and serve."""
    interactions, items = _dataset(ctx)
    ts = interactions["timestamp"]
    start, end = int(ts.min()), int(ts.max())  # type: ignore[arg-type]
    if ctx.evaluate:
        try:
            test_cutoff: int | None = holdout_cutoff(interactions, ctx.cfg.split.test_days)
        except ValueError as exc:
            raise PipelineError(f"cannot hold out a test period: {exc}") from exc
        windows = compute_windows(start, end, test_cutoff, ctx.cfg.split.valid_days)
    else:
        windows = compute_windows(start, data_end(interactions) - 1, None, ctx.cfg.split.valid_days)
    for name, lo, hi in (
        ("encoder training", start, windows.T2),
        ("ranker training labels", windows.T2, windows.T1),
        ("ranker validation labels", windows.T1, windows.T),
    ):
        if _between(interactions, lo, hi).height == 0:
            raise PipelineError(f"the {name} window [{_iso(lo)}, {_iso(hi)}) has no interactions")
    if ctx.evaluate and interactions.filter(pl.col("timestamp") >= windows.T).height == 0:
        raise PipelineError(f"the test period (>= {_iso(windows.T)}) has no interactions")
    served = select_catalogue(
        items,
        _before(interactions, windows.T),
        ctx.budget.max_catalogue_items,
        ctx.cfg.pipeline.seed,
        ctx.cfg.pipeline.catalogue_half_life_days,
    )
    if served.height < items.height:
        log.info("catalogue capped to %d of %d items (budget)", served.height, items.height)
    served.write_parquet(out / "served_items.parquet")
    write_json(out / "windows.json", asdict(windows))
    log.info(
        "windows: encoder < %s, ranker train [%s, %s), valid [%s, %s), test >= %s",
        _iso(windows.T2), _iso(windows.T2), _iso(windows.T1), _iso(windows.T1), _iso(windows.T), _iso(windows.T),
    )  # fmt: skip
    ctx.memo["windows"] = windows
    ctx.memo["served_items"] = served


RAW_EMBEDDINGS = "raw_item_embeddings.npy"  # raw (not fine-tuned) encoder, row i = catalog item i


def stage_finetune(ctx: RunContext, out: Path) -> None:
    """Fine-tune BERT + user tower on data < T2 (early stopping on [T2, T1))."""
    from training.finetune import finetune

    interactions, _ = _dataset(ctx)
    windows = _windows(ctx, "finetune")
    items = _served_items(ctx, "finetune")
    result = finetune(
        _before(interactions, windows.T2),
        items,
        ctx.cfg.encoder,
        ctx.cfg.text,
        out,
        valid=_between(interactions, windows.T2, windows.T1) if ctx.budget.finetune_validation else None,
        progress=ctx.progress,
    )
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # resumable state, not part of a bundle
    np.save(out / "item_embeddings.npy", np.ascontiguousarray(result.item_embeddings, dtype=np.float32))
    if result.raw_item_embeddings is not None:  # the raw baseline's vectors: stage embed reuses them
        np.save(out / RAW_EMBEDDINGS, np.ascontiguousarray(result.raw_item_embeddings, dtype=np.float32))
    hist = result.history
    curve = [{"step": i + 1, "loss": float(v)} for i, v in enumerate(hist.losses)]
    write_json(
        out / "summary.json",
        {
            "steps": result.steps,
            "best_step": result.best_step,
            "pairs": result.n_pairs,
            "valid_recall_before": result.valid_recall_before,
            "valid_recall_after": result.valid_recall_after,
            "valid_k": ctx.cfg.encoder.valid_k,
            "tower_choice": hist.tower_choice,
            "tower_holdout_recall": hist.tower_holdout_recall,
            "seconds": result.seconds,
            "raw_precision": result.raw_precision,
            "trainable_layers": result.trainable_layers,
            "state_cache_gb": round(result.state_cache_bytes / 1e9, 3),
            "loss_curve": curve,
            "valid_curve": [{"step": s, "recall": r} for s, r in zip(hist.valid_steps, hist.valid_recall)],
        },
    )
    ctx.memo["tower"] = result.tower_params


def stage_embed(ctx: RunContext, out: Path) -> None:
    """Item embeddings of the served catalogue from the fine-tuned encoder (row i = catalog item i);
    with evaluation, also from the raw encoder for the raw-vs-fine-tuned comparison."""
    from recsvc.encoder import TextEncoder
    from training.embed import embed_catalogue

    ft = ctx.work.require("finetune", "embed")
    items = _served_items(ctx, "embed")
    enc_cfg = ctx.cfg.encoder
    device = ctx.budget.device
    tuned_path = ft / "item_embeddings.npy"
    tuned = np.load(tuned_path) if tuned_path.is_file() else None
    if tuned is None or tuned.shape[0] != items.height:
        encoder = TextEncoder.load(ft / "encoder", device=device, precision=enc_cfg.precision,
                                   max_tokens=ctx.cfg.text.max_tokens)  # fmt: skip
        _, tuned = embed_catalogue(encoder, items, ctx.cfg.text, enc_cfg.embed_batch_size, ctx.progress)
    np.save(out / "item_embeddings.npy", np.ascontiguousarray(tuned, dtype=np.float32))
    ctx.memo["item_embeddings"] = tuned
    if ctx.evaluate:
        # Fine-tuning's first pass embedded the catalogue with the raw encoder exactly as the
        # baseline does; otherwise the raw vectors come from the on-disk cache (keyed by model
        # files, text config, texts and precision) or are computed once more.
        from training.text_baseline import cached_catalogue_embeddings, store_catalogue_embeddings

        raw_path = ft / RAW_EMBEDDINGS
        raw = np.load(raw_path) if raw_path.is_file() else None
        if raw is not None and raw.shape == tuned.shape:
            precision = read_json(ft / "summary.json")["raw_precision"]
            store_catalogue_embeddings(enc_cfg.model_dir, items, ctx.cfg.text, raw, precision)
            log.info("raw-encoder embeddings reused from the fine-tuning pass")
        else:
            raw = cached_catalogue_embeddings(
                enc_cfg.model_dir,
                items,
                ctx.cfg.text,
                batch_size=enc_cfg.embed_batch_size,
                precision=enc_cfg.precision,
                progress=ctx.progress,
            )
        np.save(out / RAW_EMBEDDINGS, np.ascontiguousarray(raw, dtype=np.float32))


def stage_index(ctx: RunContext, out: Path) -> None:
    """FAISS index over the fine-tuned embeddings, with ANN recall measured on real user vectors."""
    from recsvc.retrieval import ItemIndex

    emb = _item_embeddings(ctx, "index")
    index = ItemIndex.build(emb, ctx.cfg.index)
    queries = _sample_user_vectors(ctx, emb, ctx.cfg.index.recall_sample_users)
    k = min(ctx.cfg.candidates.ann, len(emb))
    recall = index.measure_recall(queries, k) if len(queries) else float("nan")
    log.info(
        "ANN recall@%d vs exact search on %d real user vectors: %.4f (%s index)",
        k,
        len(queries),
        recall,
        index.kind,
    )
    index.save(out)
    ctx.memo["index"] = index
    write_json(
        out / "ann.json",
        {"recall": recall, "k": k, "users": len(queries), "kind": index.kind, "params": index.params},
    )


def _sample_user_vectors(ctx: RunContext, emb: np.ndarray, n: int) -> np.ndarray:
    """User-tower vectors of a seeded sample of users with history before T (what serving sees)."""
    from recsvc.catalog import Catalog
    from recsvc.features import tower_inputs
    from recsvc.history import HistoryStore
    from recsvc.user_tower import user_vector

    interactions, _ = _dataset(ctx)
    windows = _windows(ctx, "index")
    tower = _tower(ctx, "index")
    catalog = Catalog.from_items(_served_items(ctx, "index"), ctx.cfg.text.attribute_columns)
    history = HistoryStore.from_interactions(_before(interactions, windows.T), catalog)
    users = history.users()
    if not users:
        return np.zeros((0, emb.shape[1]), np.float32)
    rng = np.random.default_rng(ctx.cfg.pipeline.seed)
    picked = rng.choice(len(users), size=min(n, len(users)), replace=False)
    vectors = []
    for i in sorted(picked):
        h = history.get(users[i])
        vectors.append(user_vector(tower, *tower_inputs(h, emb, windows.T, tower.history_len)))
    return np.vstack(vectors).astype(np.float32)


def stage_state(ctx: RunContext, out: Path) -> None:
    """Serving state at T: catalogue, histories, item stats and co-occurrence from data < T."""
    from recsvc.catalog import Catalog
    from training.train_ranker import state_at

    interactions, _ = _dataset(ctx)
    windows = _windows(ctx, "state")
    catalog = Catalog.from_items(_served_items(ctx, "state"), ctx.cfg.text.attribute_columns)
    state = state_at(
        _before(interactions, windows.T), catalog, windows.T, ctx.cfg.candidates, ctx.cfg.collaborative
    )
    catalog.save(out / "catalog.parquet")
    state.history.save(out / "history.parquet")
    state.stats.save(out / "item_stats.npz")
    state.cooc.save(out / "cooccurrence.npz")
    if state.cf is not None:
        state.cf.save(out / CF_FILE)
    ctx.memo["catalog"] = catalog


def stage_ranker(ctx: RunContext, out: Path) -> None:
    """LightGBM lambdarank: labels [T2, T1) with features < T2, validated on [T1, T)."""
    from training.train_ranker import train_ranker

    interactions, _ = _dataset(ctx)
    windows = _windows(ctx, "ranker")
    result = train_ranker(
        _before(interactions, windows.T),
        t2=windows.T2,
        t1=windows.T1,
        t_end=windows.T,
        catalog=_catalog(ctx, "ranker"),
        item_emb=_item_embeddings(ctx, "ranker"),
        index=_index(ctx, "ranker"),
        tower=_tower(ctx, "ranker"),
        config=ctx.cfg,
        progress=ctx.progress,
    )
    result.ranker.save(out / "ranker")
    if result.novel_ranker is not None:
        result.novel_ranker.save(out / bundle.NOVEL_RANKER_DIR)
    write_json(out / "ranker_metrics.json", result.metrics)
    write_json(out / "importance.json", _feature_importance(result.ranker))


def _feature_importance(ranker: Any) -> dict[str, float]:
    """Total gain per feature, as the ranker reports it."""
    return ranker.feature_importance()


BUNDLE_PARTS = (
    ("finetune", "encoder"),
    ("finetune", "user_tower.npz"),
    ("embed", "item_embeddings.npy"),
    ("index", "index.faiss"),
    ("index", "index.json"),
    ("state", "catalog.parquet"),
    ("state", "history.parquet"),
    ("state", "item_stats.npz"),
    ("state", "cooccurrence.npz"),
    ("ranker", "ranker"),
)
# Optional part: present when CollaborativeConfig.enabled (bundles without it serve without cf).
CF_FILE = bundle.CF_FILE


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (stage outputs are never modified in place) or copy across filesystems."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            _link_or_copy(child, dst / child.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def assemble_bundle(ctx: RunContext, target: Path) -> None:
    """Place every stage output where the bundle layout wants it."""
    for stage, rel in BUNDLE_PARTS:
        src = ctx.work.require(stage, "publish") / rel
        if not src.exists():
            raise PipelineError(f"stage '{stage}' did not produce {rel} in {src.parent}")
        _link_or_copy(src, target / rel)
    novel = ctx.work.require("ranker", "publish") / bundle.NOVEL_RANKER_DIR
    if novel.exists():
        _link_or_copy(novel, target / bundle.NOVEL_RANKER_DIR)
    cf = ctx.work.require("state", "publish") / CF_FILE
    if ctx.cfg.collaborative.enabled:
        if not cf.exists():
            raise PipelineError(f"stage 'state' did not produce {CF_FILE} in {cf.parent}")
        _link_or_copy(cf, target / CF_FILE)


def base_manifest(ctx: RunContext) -> dict[str, Any]:
    """Facts about the run for manifest.json (the bundle adds versions and checksums)."""
    from recsvc.features import FEATURE_NAMES

    windows = _windows(ctx, "publish")
    interactions, items = _dataset(ctx)
    served = _served_items(ctx, "publish")
    ann = read_json(ctx.work.require("index", "publish") / "ann.json")
    return {
        "config": to_dict(ctx.cfg),
        "item_count": served.height,
        "catalogue_items_total": items.height,
        "feature_names": list(FEATURE_NAMES),
        "data_end_ts": windows.T,
        "windows": asdict(windows),
        "training_rows": _before(interactions, windows.T).height,
        "budget": asdict(ctx.budget),
        "index": {
            "kind": ann["kind"],
            **ann["params"],
            "measured_ann_recall": ann["recall"],
            "ann_recall_k": ann["k"],
            "ann_recall_users": ann["users"],
        },
        "evaluated": ctx.evaluate,
    }


def _encoder_system(name: str, served_ids: np.ndarray, served_emb: np.ndarray, cfg: TrainConfig) -> Any:
    """Retrieval-only encoder baseline over the embeddings this run computed (no re-embedding)."""
    import faiss

    from training.baselines import PAD
    from training.text_baseline import EncoderRetrieval, recent_history_matrix

    class PrecomputedEncoderRetrieval(EncoderRetrieval):
        """EncoderRetrieval whose catalogue vectors come from the pipeline; items outside the
        served catalogue are not retrievable (they are still part of the evaluated catalogue)."""

        def _fit_model(self, data: Any) -> None:
            position = {item: i for i, item in enumerate(data.catalogue_ids.to_list())}
            rows = np.asarray([position[i] for i in served_ids], dtype=np.int64)
            full = np.zeros((data.n_items, served_emb.shape[1]), dtype=np.float32)
            full[rows] = served_emb
            self.item_embeddings = full
            self._index = faiss.IndexIDMap(faiss.IndexFlatIP(served_emb.shape[1]))
            self._index.add_with_ids(np.ascontiguousarray(served_emb, dtype=np.float32), rows)
            users = recent_history_matrix(data, self.history_len, self.history_half_life_days) @ full
            norms = np.linalg.norm(users, axis=1, keepdims=True)
            self.user_vectors = np.divide(users, norms, out=np.zeros_like(users), where=norms > 0).astype(
                np.float32
            )

        def _personal(self, rows: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
            assert self._data is not None
            n_items = self._data.n_items
            items = np.full((rows.size, k), PAD, dtype=np.int64)
            scores = np.full((rows.size, k), -np.inf, dtype=np.float32)
            known = np.flatnonzero(np.linalg.norm(self.user_vectors[rows], axis=1) > 0)
            if known.size == 0:
                return items, scores
            seen = self._seen[rows[known]]
            extra = int(np.diff(seen.indptr).max()) if exclude_seen and seen.nnz else 0
            depth = min(self._index.ntotal, k + extra)
            found_scores, found = self._index.search(self.user_vectors[rows[known]], depth)
            if exclude_seen:
                keys = np.arange(known.size)[:, None] * n_items + found
                coo = seen.tocoo()
                seen_keys = coo.row.astype(np.int64) * n_items + coo.col
                found_scores = np.where(np.isin(keys, seen_keys) | (found < 0), -np.inf, found_scores)
            order = np.argsort(-found_scores, axis=1, kind="stable")[:, :k]
            top = np.take_along_axis(found, order, axis=1)
            top_scores = np.take_along_axis(found_scores, order, axis=1)
            items[known, : top.shape[1]] = np.where(np.isfinite(top_scores), top, PAD)
            scores[known, : top.shape[1]] = top_scores
            return items, scores

    return PrecomputedEncoderRetrieval(
        name=name,
        text_cfg=cfg.text,
        history_len=cfg.encoder.history_len,
        popularity_window_days=cfg.baselines.popularity_window_days,
        batch_users=cfg.baselines.batch_users,
        progress=False,
    )


def stage_evaluate(ctx: RunContext, out: Path) -> None:
    """Every baseline, both encoders and the full pipeline on the same test period and users.

    The pipeline is scored through a bundle assembled from this run's outputs, loaded with
    `bundle.load` and answered by `Recommender.recommend_many`: the served code path.
    """
    from recsvc.recommender import Recommender
    from training.eval_cli import build_systems
    from training.evaluate import evaluate_systems

    interactions, items = _dataset(ctx)
    windows = _windows(ctx, "evaluate")
    served = _served_items(ctx, "evaluate")
    cfg = ctx.cfg
    train, test = _before(interactions, windows.T), interactions.filter(pl.col("timestamp") >= windows.T)

    staged = out / "bundle"
    staged.mkdir()
    assemble_bundle(ctx, staged)
    bundle.write_manifest(staged, base_manifest(ctx))
    loaded = bundle.load(staged)
    recommender = Recommender(loaded)
    recommender.warm()

    eval_cfg = replace(
        cfg.eval, tune_max_users=_min_optional(cfg.eval.tune_max_users, ctx.budget.eval_max_users)
    )
    baselines, tuning = build_systems(
        [s for s in BASELINE_SYSTEMS if s in cfg.eval.systems],
        train,
        items,
        baseline_config=cfg.baselines,
        eval_config=eval_cfg,
        valid_days=cfg.split.valid_days,
        do_tune=cfg.eval.tune,
    )
    served_ids = served["item_id"].to_numpy().astype(object)
    embed_dir = ctx.work.require("embed", "evaluate")
    encoders = [
        _encoder_system("raw_encoder", served_ids, np.load(embed_dir / RAW_EMBEDDINGS), cfg),
        _encoder_system("finetuned_encoder", served_ids, _item_embeddings(ctx, "evaluate"), cfg),
    ]
    pipeline_system = RecommenderSystem(recommender, progress=ctx.progress)
    table = evaluate_systems(
        [*baselines, *encoders, pipeline_system],
        train,
        test,
        items,
        ks=cfg.eval.ks,
        modes=cfg.eval.modes,
        max_users=ctx.budget.eval_max_users,
        seed=cfg.eval.seed,
        protocol={
            "test_cutoff": windows.T,
            "served_catalogue_items": served.height,
            "pipeline_path": "bundle.load -> Recommender.recommend_many",
        },
    )
    table.to_json(out / "evaluation.json")
    log.info("evaluation on the test period:\n%s", table.to_console())
    summary = summarise_evaluation(table, cfg.eval.ks)
    summary["tuning"] = tuning
    write_json(out / "metrics.json", summary)
    shutil.rmtree(staged)  # hard links; the published bundle is re-assembled from the same files
    ctx.memo["evaluation"] = summary


def stage_publish(ctx: RunContext, out: Path) -> str:
    """Assemble the bundle (parts + metrics.json + report/), write the manifest, publish atomically."""
    staging = bundle.new_staging_dir(ctx.bundles_root)
    try:
        assemble_bundle(ctx, staging)
        metrics = collected_metrics(ctx)
        write_json(staging / "metrics.json", metrics)
        ft = read_json(ctx.work.require("finetune", "publish") / "summary.json")
        importance = read_json(ctx.work.require("ranker", "publish") / "importance.json")
        report.write_report(
            staging / "report",
            metrics.get("evaluation", {}),
            loss_curve=ft["loss_curve"],
            feature_importance=importance,
            timings={k: v for k, v in ctx.timings.items() if k != "publish"},
            facts={
                "test cutoff T": _iso(_windows(ctx, "publish").T) if ctx.evaluate else "none (production)",
                "served items": _served_items(ctx, "publish").height,
                "fine-tuning steps": ft["steps"],
                "ANN recall": metrics.get("ann", {}).get("recall"),
            },
        )
        manifest = {**base_manifest(ctx), "metrics": metrics, "timings": dict(ctx.timings)}
        version = bundle.publish(staging, ctx.bundles_root, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json(out / "published.json", {"version": version})
    evaluation = metrics.get("evaluation")
    if evaluation:
        log.info("metrics:\n%s", report.console_table(evaluation))
    return version


def collected_metrics(ctx: RunContext) -> dict[str, Any]:
    """Every metric the run produced so far, read from the work dir (empty parts skipped)."""
    out: dict[str, Any] = {}
    sources = (
        ("finetune", "summary.json", "finetune"),
        ("index", "ann.json", "ann"),
        ("ranker", "ranker_metrics.json", "ranker"),
        ("evaluate", "metrics.json", "evaluation"),
    )
    for stage, name, key in sources:
        path = ctx.work.stage_dir(stage) / name
        if path.is_file() and ctx.work.is_done(stage, ctx.fingerprints[stage]):
            data = read_json(path)
            if key == "finetune":
                data = {k: v for k, v in data.items() if k != "loss_curve"}
            out[key] = data
    if "evaluation" in out:
        out["headline"] = report.headline_ratios(out["evaluation"])
    return out


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


STAGE_FUNCTIONS: dict[str, Callable[[RunContext, Path], Any]] = {
    "load": stage_load,
    "split": stage_split,
    "finetune": stage_finetune,
    "embed": stage_embed,
    "index": stage_index,
    "state": stage_state,
    "ranker": stage_ranker,
    "evaluate": stage_evaluate,
    "publish": stage_publish,
}
