"""Fine-tune BERT and the user tower on "history -> next item" pairs (nanoGPT-style, one readable loop).

Training pairs come from time-ordered logs: every interaction that has >= 1 earlier item of the
same user becomes (context = the user's last `history_len` earlier items, most recent first ->
the item). The context side is cheap: history items are looked up in an embedding CACHE (the
catalogue embedded with the current encoder, refreshed at every epoch start and every
validation), and pooled by the user tower. Only the positives go through BERT with gradients.

The first pass embeds the WHOLE catalogue with the raw encoder: those vectors are the step-0 cache
and, single-process, exactly the raw-encoder baseline's embeddings (`FinetuneResult.
raw_item_embeddings`, same tokenisation, precision and batching as `TextEncoder.encode`). With
`trainable_layers` = N, the embeddings and lower layers are frozen and that pass also keeps the
hidden states entering the first trainable layer for every item (`LayerStates`): training steps,
cache refreshes and the final re-embedding then run only the top N layers, which is the same model
as a full forward with the frozen layers below (up to the states' bf16 rounding).

Loss: sampled softmax with in-batch negatives, temperature, logQ popularity correction and
masking of in-batch duplicates of a row's positive (`sampled_softmax_loss`).

After the loop, the catalogue is re-embedded with the final encoder and the user tower alone is
refitted on those embeddings (BERT frozen), so serving, which pools final embeddings, sees exactly
what the tower was trained on.

The tower starts as the raw-encoder baseline's recency-weighted mean pooling, and the refit holds
out the most recent pairs: if the learned tower does not beat that plain pooling on them (Recall@
valid_k over the catalogue), plain pooling is what ships. A few CPU steps can thus never make user
vectors worse than the simple baseline.

Runs single-process or under `torchrun --nproc_per_node N -m training.finetune ...` (DDP; gloo on
CPU, nccl on GPU); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from recsvc.config import DAY, EncoderConfig, SplitConfig, TextConfig, to_dict
from recsvc.encoder import (
    LayerStates,
    TextEncoder,
    autocast_context,
    bert_layers,
    forward_from_layer,
    mean_pool,
)
from recsvc.text import item_texts
from recsvc.user_tower import TowerParams, UserTower, save_params

log = logging.getLogger("training.finetune")  # same name under `python -m`

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.pt"


class FinetuneError(ValueError):
    """Fine-tuning cannot run on this input (no training pairs, bad option, ...)."""


# ----------------------------------------------------------------------------- training pairs


@dataclass(frozen=True)
class Histories:
    """Padded user contexts: row r = one (user, reference time); item -1 = padding."""

    items: np.ndarray  # int32 [n, L], most recent first
    ages_s: np.ndarray  # float32 [n, L], reference time - interaction time
    weights: np.ndarray  # float32 [n, L], event weights

    @property
    def mask(self) -> np.ndarray:
        return self.items >= 0


@dataclass(frozen=True)
class TrainingPairs:
    """(context -> next item) pairs, most recent first, at most `max_train_pairs`."""

    context: Histories
    targets: np.ndarray  # int32 [P] catalogue row of the next item
    weights: np.ndarray  # float32 [P] event weight of the next item
    timestamps: np.ndarray  # int64 [P]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def _user_ordered(interactions: pl.DataFrame, item_index: dict[str, int]) -> pl.DataFrame:
    """Rows with a catalogue item, grouped by user, chronological inside a user (ties keep file order)."""
    idx = pl.DataFrame({"item_id": list(item_index), "item": np.arange(len(item_index), dtype=np.int32)})
    return (
        interactions.select("user_id", "item_id", "timestamp", "weight")
        .with_row_index("row")
        .join(idx, on="item_id", how="inner")
        .sort(["user_id", "timestamp", "row"])
    )


def _gather_history(
    items: np.ndarray,
    ts: np.ndarray,
    w: np.ndarray,
    ends: np.ndarray,
    counts: np.ndarray,
    ref_ts: np.ndarray,
    length: int,
) -> Histories:
    """For each anchor, the `counts` rows before position `ends` (exclusive), most recent first."""
    offsets = np.arange(1, length + 1)
    pos = ends[:, None] - offsets[None, :]
    valid = offsets[None, :] <= np.minimum(counts, length)[:, None]
    pos = np.where(valid, pos, 0)
    return Histories(
        items=np.where(valid, items[pos], -1).astype(np.int32),
        ages_s=np.where(valid, ref_ts[:, None] - ts[pos], 0).astype(np.float32),
        weights=np.where(valid, w[pos], 0).astype(np.float32),
    )


def build_pairs(
    interactions: pl.DataFrame, item_index: dict[str, int], history_len: int, max_pairs: int
) -> TrainingPairs:
    """Every interaction with >= 1 earlier item of its user; the most recent `max_pairs` are kept."""
    df = _user_ordered(interactions, item_index)
    items = df.get_column("item").to_numpy()
    ts = df.get_column("timestamp").to_numpy().astype(np.int64)
    w = df.get_column("weight").to_numpy().astype(np.float32)
    user_start = df.with_row_index("i").group_by("user_id", maintain_order=True).agg(pl.col("i").min())
    first = np.zeros(df.height, dtype=np.int64)
    starts = user_start.get_column("i").to_numpy().astype(np.int64)
    first[starts] = starts
    first = np.maximum.accumulate(first)
    position = np.arange(df.height) - first
    anchors = np.flatnonzero(position >= 1)
    if max_pairs and anchors.size > max_pairs:
        recent = np.argsort(-ts[anchors], kind="stable")[:max_pairs]
        anchors = np.sort(anchors[recent])
    context = _gather_history(items, ts, w, anchors, position[anchors], ts[anchors], history_len)
    return TrainingPairs(context, items[anchors].astype(np.int32), w[anchors], ts[anchors])


def last_histories(
    interactions: pl.DataFrame, item_index: dict[str, int], history_len: int, now: int
) -> tuple[list[str], Histories]:
    """Each user's last `history_len` items before `now` (the context a request would see)."""
    df = _user_ordered(interactions.filter(pl.col("timestamp") < now), item_index)
    if df.height == 0:
        empty = np.zeros((0, history_len))
        return [], Histories(empty.astype(np.int32), empty.astype(np.float32), empty.astype(np.float32))
    items = df.get_column("item").to_numpy()
    ts = df.get_column("timestamp").to_numpy().astype(np.int64)
    w = df.get_column("weight").to_numpy().astype(np.float32)
    per_user = (
        df.with_row_index("i")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("i").max().alias("last"), pl.len().alias("n"))
    )
    ends = per_user.get_column("last").to_numpy().astype(np.int64) + 1
    counts = per_user.get_column("n").to_numpy().astype(np.int64)
    hist = _gather_history(items, ts, w, ends, counts, np.full(ends.shape, now, dtype=np.int64), history_len)
    return per_user.get_column("user_id").to_list(), hist


@dataclass(frozen=True)
class ValidationSet:
    """Users with a training context and >= 1 catalogue item in the validation period."""

    context: Histories
    targets: list[np.ndarray]  # per user: catalogue rows interacted with in the validation period


def build_validation(
    train: pl.DataFrame,
    valid: pl.DataFrame,
    item_index: dict[str, int],
    history_len: int,
    max_users: int,
    seed: int,
) -> ValidationSet | None:
    if valid.height == 0:
        return None
    now = int(valid.get_column("timestamp").min())
    users, context = last_histories(train, item_index, history_len, now)
    known = valid.filter(pl.col("item_id").is_in(list(item_index)) & pl.col("user_id").is_in(users))
    if known.height == 0:
        return None
    targets = known.group_by("user_id").agg(pl.col("item_id").unique()).sort("user_id")
    row_of = {u: i for i, u in enumerate(users)}
    chosen = np.array([row_of[u] for u in targets.get_column("user_id").to_list()], dtype=np.int64)
    target_rows = [
        np.array([item_index[i] for i in ids], dtype=np.int64) for ids in targets.get_column("item_id")
    ]
    if max_users and chosen.size > max_users:
        keep = np.sort(np.random.default_rng(seed).choice(chosen.size, size=max_users, replace=False))
        chosen, target_rows = chosen[keep], [target_rows[i] for i in keep]
    sub = Histories(context.items[chosen], context.ages_s[chosen], context.weights[chosen])
    return ValidationSet(sub, target_rows)


def validation_recall(
    tower: UserTower, cache: torch.Tensor, vset: ValidationSet, k: int, chunk: int = 256
) -> float:
    """Mean Recall@k of next-period items, ranked over the FULL catalogue by tower · item."""
    hits = []
    with torch.inference_mode():
        for start in range(0, len(vset.targets), chunk):
            sl = slice(start, start + chunk)
            users = tower(*_history_tensors(vset.context, sl, cache))
            top = torch.topk(users @ cache.T, k=min(k, cache.shape[0]), dim=1).indices.cpu().numpy()
            for row, targets in zip(top, vset.targets[sl]):
                hits.append(np.isin(targets, row).sum() / len(targets))
    return float(np.mean(hits)) if hits else float("nan")


def _history_tensors(
    hist: Histories, rows: slice | np.ndarray, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    items = torch.from_numpy(hist.items[rows]).long().to(cache.device)
    mask = items >= 0
    emb = cache[items.clamp(min=0)] * mask.unsqueeze(-1)
    ages = torch.from_numpy(hist.ages_s[rows]).to(cache.device)
    weights = torch.from_numpy(hist.weights[rows]).to(cache.device)
    return emb, ages, weights, mask


# ----------------------------------------------------------------------------- loss


def sampled_softmax_loss(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    item_ids: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax.

    user_vecs [B, d]; item_vecs [C, d] are the batch's columns (each row's positive, possibly
    repeated, plus any hard negatives); item_ids [C] their catalogue ids; targets [B] the column of
    each row's positive. logits = u·v / T - log q(v) (logQ removes the popularity bias of in-batch
    sampling). A column holding the SAME item as a row's positive (other than the target column)
    is masked: it is not a negative. Loss = weighted mean cross-entropy.
    """
    logits = user_vecs.float() @ item_vecs.float().T / temperature
    if log_q is not None:
        logits = logits - log_q.float()[None, :]
    rows = torch.arange(targets.shape[0], device=targets.device)
    duplicate = item_ids[None, :] == item_ids[targets][:, None]
    duplicate[rows, targets] = False
    logits = logits.masked_fill(duplicate, float("-inf"))
    ce = nn.functional.cross_entropy(logits, targets, reduction="none")
    if row_weights is None:
        return ce.mean()
    w = row_weights.float()
    return (ce * w).sum() / w.sum().clamp(min=1e-12)


# ----------------------------------------------------------------------------- model + runtime


class TwoTower(nn.Module):
    """BERT (item side, through text) + user tower (history side) in one module, so DDP syncs both.

    With `first_layer` set, the item side takes cached (hidden, attention mask) states entering that
    layer instead of tokens and runs only the layers from there up.
    """

    def __init__(
        self,
        bert: nn.Module,
        tower: UserTower,
        device: torch.device,
        precision: str,
        first_layer: int | None = None,
    ) -> None:
        super().__init__()
        self.bert = bert
        self.tower = tower
        self.device_type = device
        self.precision = precision
        self.first_layer = first_layer

    def forward(
        self,
        item_inputs: dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
        hist: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_context(self.device_type, self.precision):
            if isinstance(item_inputs, dict):
                mask = item_inputs["attention_mask"]
                last = self.bert(**item_inputs).last_hidden_state
            else:
                assert self.first_layer is not None, "cached states need TwoTower(first_layer=...)"
                hidden, mask = item_inputs
                last = forward_from_layer(self.bert, hidden, mask, self.first_layer)
        items = mean_pool(last, mask)
        users = self.tower(*hist)  # fp32: tiny, and must match the numpy serving maths
        return users, items


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_runtime() -> Runtime:
    """Join the torchrun process group when launched by torchrun, else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Runtime(rank, world, device)


def embed_rows(
    encode: Callable[[np.ndarray, bool], np.ndarray], rows: np.ndarray, dim: int, rt: Runtime, progress: bool
) -> torch.Tensor:
    """float32 [len(rows), dim] = encode(rows, progress); under DDP each rank encodes a shard."""
    if rt.world == 1:
        return torch.from_numpy(encode(rows, progress)).to(rt.device)
    shard = math.ceil(len(rows) / rt.world)
    mine = encode(rows[rt.rank * shard : (rt.rank + 1) * shard], progress and rt.main)
    padded = torch.zeros((shard, dim), dtype=torch.float32, device=rt.device)
    padded[: mine.shape[0]] = torch.from_numpy(mine).to(rt.device)
    parts = [torch.zeros_like(padded) for _ in range(rt.world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[: len(rows)]


def raw_catalogue_pass(
    encoder: TextEncoder,
    texts: list[str],
    batch_size: int,
    rt: Runtime,
    progress: bool,
    capture_layer: int | None,
) -> tuple[torch.Tensor, LayerStates | None]:
    """The one full-BERT pass over the catalogue: embeddings (+ states entering `capture_layer`).

    Single-process this is `encoder.encode(texts, batch_size)` bit for bit. Under DDP each rank
    encodes a shard and all ranks receive every row (states too: every rank trains on any item).
    """
    if capture_layer is None:
        return embed_rows(
            lambda r, bar: encoder.encode([texts[i] for i in r], batch_size, progress=bar),
            np.arange(len(texts)), encoder.dim, rt, progress,
        ), None  # fmt: skip
    if rt.world == 1:
        emb, states = encoder.encode_with_states(texts, capture_layer, batch_size, progress=progress)
        return torch.from_numpy(emb).to(rt.device), states
    shard = math.ceil(len(texts) / rt.world)
    mine, part = encoder.encode_with_states(
        texts[rt.rank * shard : (rt.rank + 1) * shard],
        capture_layer,
        batch_size,
        progress=progress and rt.main,
    )
    width = torch.tensor([part.hidden.shape[1]], device=rt.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    emb = torch.zeros((shard, encoder.dim), dtype=torch.float32, device=rt.device)
    emb[: mine.shape[0]] = torch.from_numpy(mine)
    hidden = torch.zeros((shard, int(width), encoder.dim), dtype=part.hidden.dtype, device=rt.device)
    hidden[: len(part), : part.hidden.shape[1]] = part.hidden
    lengths = torch.zeros(shard, dtype=torch.long, device=rt.device)
    lengths[: len(part)] = part.lengths
    gathered = []
    for local in (emb, hidden.view(torch.uint8), lengths):  # bytes: any dtype, any backend
        parts = [torch.zeros_like(local) for _ in range(rt.world)]
        dist.all_gather(parts, local)
        gathered.append(torch.cat(parts)[: len(texts)].cpu())
    states = LayerStates(capture_layer, gathered[1].view(part.hidden.dtype), gathered[2], part.input_dtype)
    return gathered[0].to(rt.device), states


def hard_negatives(cache: torch.Tensor, positives: torch.Tensor, n: int) -> torch.Tensor:
    """The n nearest catalogue neighbours of each positive (by cached embedding), itself excluded."""
    scores = cache[positives] @ cache.T
    scores[torch.arange(positives.shape[0]), positives] = float("-inf")
    return torch.topk(scores, k=min(n, cache.shape[0] - 1), dim=1).indices.reshape(-1)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def state_checksum(module: nn.Module) -> str:
    """sha256 over every tensor of a state dict (order-stable): equal weights <=> equal checksum."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- result


@dataclass
class FinetuneHistory:
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step
    valid_steps: list[int] = field(default_factory=list)
    valid_recall: list[float] = field(default_factory=list)  # Recall@valid_k at valid_steps
    step_seconds: list[float] = field(default_factory=list)
    tower_refit_losses: list[float] = field(default_factory=list)
    # Held-out Recall@valid_k of the learned tower and of plain recency pooling; which one shipped.
    tower_holdout_recall: dict[str, float] = field(default_factory=dict)
    tower_choice: str = ""


@dataclass
class FinetuneResult:
    encoder_dir: Path
    tower_params: TowerParams
    tower_path: Path
    item_ids: np.ndarray  # object [n_items], catalogue order of `items`
    item_embeddings: np.ndarray  # float32 [n_items, d], final encoder, L2-normalised
    # float32 [n_items, d] from the RAW encoder: bit-identical to the raw-encoder baseline's
    # `encode` (single process); None under DDP, whose sharded batches differ.
    raw_item_embeddings: np.ndarray | None
    raw_precision: str  # resolved precision of that raw pass (part of the embedding cache key)
    history: FinetuneHistory
    steps: int
    best_step: int
    n_pairs: int
    valid_recall_before: float | None  # raw encoder + untrained tower, step 0
    valid_recall_after: float | None  # final encoder + refitted tower
    seconds: float
    weights_checksum: str  # sha256 of the final BERT + tower weights (equal across DDP ranks)
    trainable_layers: int = 0  # BERT layers trained (the others frozen)
    state_cache_bytes: int = 0  # memory held by the cached layer states (0 = full fine-tuning)


# ----------------------------------------------------------------------------- the loop


def finetune(
    interactions_train: pl.DataFrame,
    items: pl.DataFrame,
    cfg: EncoderConfig,
    text_cfg: TextConfig,
    out_dir: str | Path,
    *,
    valid: pl.DataFrame | None = None,
    progress: bool = True,
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune the encoder + user tower; write `encoder/`, `user_tower.npz` under out_dir (rank 0)."""
    started = time.perf_counter()
    rt = init_runtime()
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    if rt.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    _check_config(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    encoder = TextEncoder.load(
        cfg.model_dir, device=rt.device, precision=cfg.precision, max_tokens=text_cfg.max_tokens
    )
    item_ids = items.get_column("item_id").to_numpy()
    item_index = {str(i): n for n, i in enumerate(item_ids)}
    texts = item_texts(items, text_cfg)
    token_ids = encoder.token_ids(texts)
    pairs = build_pairs(interactions_train, item_index, cfg.history_len, cfg.max_train_pairs)
    if len(pairs) == 0:
        raise FinetuneError(
            "no user has >= 2 interactions with catalogue items in the training window; nothing to fine-tune"
        )
    vset = (
        build_validation(
            interactions_train, valid, item_index, cfg.history_len, cfg.valid_max_users, cfg.seed
        )
        if valid is not None
        else None
    )
    counts = np.bincount(pairs.targets, minlength=len(item_ids)).astype(np.float64)
    log_q_all = (
        torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + len(item_ids)))).float().to(rt.device)
    )
    log.info(
        "fine-tuning on %d pairs, %d items, %d validation users, world size %d",
        len(pairs),
        len(item_ids),
        0 if vset is None else len(vset.targets),
        rt.world,
    )

    first_layer = _first_trainable_layer(encoder.model, cfg.trainable_layers)
    n_trainable = len(bert_layers(encoder.model)) - (first_layer or 0)
    # The one raw full-BERT pass, before any checkpoint is loaded: raw baseline vectors, step-0
    # cache and (partial fine-tuning) the frozen layers' output for every item.
    pass_started = time.perf_counter()
    raw_cache, states = raw_catalogue_pass(
        encoder, texts, cfg.embed_batch_size, rt, progress, capture_layer=first_layer
    )
    log.info("raw catalogue pass: %d items in %.1fs", len(texts), time.perf_counter() - pass_started)
    raw_embeddings = raw_cache.cpu().numpy().copy() if rt.world == 1 else None
    if states is not None:
        log.info(
            "training the top %d BERT layers; cached states entering layer %d: %.2f GB",
            n_trainable,
            first_layer,
            states.nbytes / 1e9,
        )

    for p in encoder.model.parameters():
        p.requires_grad_(True)
    frozen: list[nn.Module] = []
    if first_layer is not None:
        frozen = [encoder.model.embeddings, *bert_layers(encoder.model)[:first_layer]]
    if getattr(encoder.model, "pooler", None) is not None:  # unused by mean pooling: keep DDP happy
        frozen.append(encoder.model.pooler)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    tower = UserTower.recency_pooling(encoder.dim, cfg.history_len, cfg.tower_init_half_life_days).to(
        rt.device
    )
    model = TwoTower(encoder.model, tower, rt.device, encoder.precision, first_layer)
    ddp = nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model

    decay, no_decay = [], []
    for p in encoder.model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": list(tower.parameters()), "lr": cfg.tower_lr, "weight_decay": 0.0},
        ]
    )
    sampler = DistributedSampler(
        range(len(pairs)), num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=cfg.seed
    )
    micro_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = max(1, int(cfg.warmup_frac * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=encoder.precision == "fp16")

    hist = FinetuneHistory()
    state = {"step": 0, "epoch": 0, "micro": 0, "best_recall": -1.0, "best_step": 0, "bad_evals": 0}
    last_path, best_path = ckpt_dir / LAST_CHECKPOINT, ckpt_dir / BEST_WEIGHTS
    if resume and last_path.is_file():
        ckpt = torch.load(last_path, map_location=rt.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state.update(ckpt["state"])
        hist = FinetuneHistory(**ckpt["history"])
        log.info("resumed from %s at step %d (epoch %d)", last_path, state["step"], state["epoch"])
    elif resume:
        log.info("resume requested but %s does not exist; starting fresh", last_path)

    # Without validation or mined negatives, training only reads history items from the cache:
    # embedding just those saves most of a catalogue pass per refresh (100k items on CPU = minutes).
    needed = None
    if vset is None and cfg.hard_negatives == 0:
        needed = np.unique(pairs.context.items[pairs.context.mask])

    def encode(rows: np.ndarray, bar: bool) -> np.ndarray:
        if states is not None:  # only the trainable layers, from the cached states
            return encoder.encode_states(states, rows, cfg.embed_batch_size, progress=bar)
        return encoder.encode([texts[i] for i in rows], cfg.embed_batch_size, progress=bar)

    def refresh_cache(full: bool = False) -> torch.Tensor:
        if full or needed is None or needed.size == len(texts):
            return embed_rows(encode, np.arange(len(texts)), encoder.dim, rt, progress)
        cache = torch.zeros((len(texts), encoder.dim), dtype=torch.float32, device=rt.device)
        cache[torch.from_numpy(needed).to(rt.device)] = embed_rows(encode, needed, encoder.dim, rt, progress)
        return cache

    def evaluate(cache: torch.Tensor) -> float | None:
        if vset is None:
            return None
        tower.eval()
        recall = validation_recall(tower, cache, vset, cfg.valid_k)
        tower.train()
        hist.valid_steps.append(state["step"])
        hist.valid_recall.append(recall)
        improved = recall > state["best_recall"] + 1e-9
        if improved:
            state.update(best_recall=recall, best_step=state["step"], bad_evals=0)
            if rt.main:
                _atomic_save({"model": model.state_dict()}, best_path)
        else:
            state["bad_evals"] += 1
        log.info(
            "step %d: validation Recall@%d = %.4f%s",
            state["step"],
            cfg.valid_k,
            recall,
            " (best)" if improved else "",
        )
        return recall

    cache = raw_cache if state["step"] == 0 else refresh_cache()
    del raw_cache
    cache_step = state["step"]
    recall_before = None
    if state["step"] == 0 and not hist.valid_steps:
        recall_before = evaluate(cache)
    elif hist.valid_recall:
        recall_before = hist.valid_recall[0]

    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc="finetune",
        unit="step",
        disable=not (progress and rt.main),
    )
    stop = state["step"] >= total_steps
    encoder.model.train()
    while not stop and state["epoch"] < cfg.epochs:
        sampler.set_epoch(state["epoch"])
        order = np.fromiter(iter(sampler), dtype=np.int64)
        if cache_step != state["step"]:
            cache, cache_step = refresh_cache(), state["step"]
        step_loss, step_pairs, t0 = 0.0, 0, time.perf_counter()
        while state["micro"] < micro_per_epoch:
            micro = state["micro"]
            batch = order[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            sync = (micro + 1) % cfg.grad_accum == 0 or micro + 1 == micro_per_epoch
            ctx = ddp.no_sync() if (rt.world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                loss = _pair_loss(ddp, encoder, pairs, batch, cache, token_ids, states, log_q_all, cfg, rt)
                scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
            step_pairs += len(batch) * rt.world
            state["micro"] += 1
            if not sync:
                continue
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            elapsed = time.perf_counter() - t0
            hist.losses.append(step_loss)
            hist.step_seconds.append(elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", pairs_s=f"{step_pairs / max(elapsed, 1e-9):.0f}")
            step_loss, step_pairs, t0 = 0.0, 0, time.perf_counter()
            if vset is not None and cfg.eval_every and state["step"] % cfg.eval_every == 0:
                cache, cache_step = refresh_cache(), state["step"]
                encoder.model.train()
                evaluate(cache)
                if state["bad_evals"] >= cfg.early_stopping_patience:
                    log.info(
                        "early stopping at step %d: no validation improvement in %d evaluations",
                        state["step"],
                        state["bad_evals"],
                    )
                    stop = True
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and rt.main:
                _save_checkpoint(last_path, model, optimizer, scheduler, state, hist, cfg)
            if state["step"] >= total_steps:
                stop = True
            if stop:
                break
        if state["micro"] >= micro_per_epoch:
            state.update(epoch=state["epoch"] + 1, micro=0)
    bar.close()

    # Final evaluation of the last weights (if not just done), then keep the best ones.
    if vset is not None and (not hist.valid_steps or hist.valid_steps[-1] != state["step"]):
        cache, cache_step = refresh_cache(), state["step"]
        evaluate(cache)
    rt.barrier()
    if vset is not None and state["best_step"] != state["step"] and best_path.is_file():
        log.info("restoring best weights from step %d", state["best_step"])
        model.load_state_dict(torch.load(best_path, map_location=rt.device, weights_only=False)["model"])
    if rt.main:
        _save_checkpoint(last_path, model, optimizer, scheduler, state, hist, cfg)

    # Serving pools FINAL embeddings: re-embed, then refit the tower alone on them.
    encoder.model.eval()
    pass_started = time.perf_counter()
    final = refresh_cache(full=True)
    log.info(
        "final re-embedding through %d layer(s): %d items in %.1fs",
        n_trainable,
        len(texts),
        time.perf_counter() - pass_started,
    )
    fit_pairs, holdout = split_recent_pairs(pairs, cfg.tower_holdout_pairs)
    _refit_tower(tower, final, fit_pairs, log_q_all, cfg, hist, progress and rt.main)
    if holdout is not None:
        pooling = UserTower.recency_pooling(encoder.dim, cfg.history_len, cfg.tower_init_half_life_days)
        choose_tower(tower, pooling.to(rt.device), final, holdout, cfg.valid_k, hist)
    recall_after = validation_recall(tower.eval(), final, vset, cfg.valid_k) if vset is not None else None
    if recall_after is not None:
        log.info("after tower refit: validation Recall@%d = %.4f", cfg.valid_k, recall_after)

    params = tower.to_params()
    encoder_dir, tower_path = out / "encoder", out / "user_tower.npz"
    if rt.main:
        encoder.save(encoder_dir)
        save_params(params, tower_path)
        (out / "finetune_history.json").write_text(json.dumps(asdict(hist)))
    rt.barrier()
    return FinetuneResult(
        encoder_dir=encoder_dir,
        tower_params=params,
        tower_path=tower_path,
        item_ids=item_ids,
        item_embeddings=final.cpu().numpy(),
        raw_item_embeddings=raw_embeddings,
        raw_precision=encoder.precision,
        history=hist,
        steps=state["step"],
        best_step=state["best_step"] if vset is not None else state["step"],
        n_pairs=len(pairs),
        valid_recall_before=recall_before,
        valid_recall_after=recall_after,
        seconds=time.perf_counter() - started,
        weights_checksum=state_checksum(model),
        trainable_layers=n_trainable,
        state_cache_bytes=0 if states is None else states.nbytes,
    )


def _pair_loss(
    model: nn.Module,
    encoder: TextEncoder,
    pairs: TrainingPairs,
    batch: np.ndarray,
    cache: torch.Tensor,
    token_ids: list[list[int]],
    states: LayerStates | None,
    log_q_all: torch.Tensor,
    cfg: EncoderConfig,
    rt: Runtime,
) -> torch.Tensor:
    """Loss of one micro-batch: unique positives (+ hard negatives) go through BERT once each
    (from their cached layer states when the lower layers are frozen)."""
    positives = torch.from_numpy(pairs.targets[batch]).long().to(rt.device)
    columns = positives
    if cfg.hard_negatives > 0:
        columns = torch.cat([positives, hard_negatives(cache, positives, cfg.hard_negatives)])
    unique, inverse = torch.unique(columns, return_inverse=True)
    rows = unique.tolist()
    item_inputs = (
        encoder.pad([token_ids[i] for i in rows]) if states is None else states.batch(rows, rt.device)
    )
    users, unique_vecs = model(item_inputs, _history_tensors(pairs.context, batch, cache))
    return sampled_softmax_loss(
        users,
        unique_vecs[inverse],
        columns,
        torch.arange(len(batch), device=rt.device),
        cfg.temperature,
        log_q=log_q_all[columns] if cfg.logq_correction else None,
        row_weights=torch.from_numpy(pairs.weights[batch]).to(rt.device),
    )


def _refit_tower(
    tower: UserTower,
    item_emb: torch.Tensor,
    pairs: TrainingPairs,
    log_q_all: torch.Tensor,
    cfg: EncoderConfig,
    hist: FinetuneHistory,
    progress: bool,
) -> None:
    """Tower-only steps on frozen final embeddings; identical on every rank (same seed, same data)."""
    if cfg.tower_refit_steps <= 0:
        return
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=cfg.tower_lr, weight_decay=0.0)
    batch_size = min(len(pairs), max(cfg.batch_size, 256))
    tower.train()
    for _ in tqdm(range(cfg.tower_refit_steps), desc="tower refit", unit="step", disable=not progress):
        batch = torch.randperm(len(pairs), generator=gen)[:batch_size].numpy()
        positives = torch.from_numpy(pairs.targets[batch]).long().to(item_emb.device)
        users = tower(*_history_tensors(pairs.context, batch, item_emb))
        loss = sampled_softmax_loss(
            users,
            item_emb[positives],
            positives,
            torch.arange(len(batch), device=item_emb.device),
            cfg.temperature,
            log_q=log_q_all[positives] if cfg.logq_correction else None,
            row_weights=torch.from_numpy(pairs.weights[batch]).to(item_emb.device),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hist.tower_refit_losses.append(float(loss.detach()))


def split_recent_pairs(pairs: TrainingPairs, n_holdout: int) -> tuple[TrainingPairs, TrainingPairs | None]:
    """(older pairs, the `n_holdout` most recent pairs); no hold-out when that would leave fewer
    fitting pairs than held-out ones (tiny data: the comparison would be noise)."""
    if n_holdout <= 0 or len(pairs) < 2 * n_holdout:
        return pairs, None
    order = np.argsort(pairs.timestamps, kind="stable")
    older, recent = np.sort(order[:-n_holdout]), np.sort(order[-n_holdout:])
    return _subset_pairs(pairs, older), _subset_pairs(pairs, recent)


def _subset_pairs(pairs: TrainingPairs, rows: np.ndarray) -> TrainingPairs:
    ctx = pairs.context
    return TrainingPairs(
        Histories(ctx.items[rows], ctx.ages_s[rows], ctx.weights[rows]),
        pairs.targets[rows],
        pairs.weights[rows],
        pairs.timestamps[rows],
    )


def pair_recall(
    tower: UserTower, item_emb: torch.Tensor, pairs: TrainingPairs, k: int, chunk: int = 256
) -> float:
    """Share of pairs whose next item is in the tower's top-k over the whole catalogue."""
    hits = 0
    with torch.inference_mode():
        for start in range(0, len(pairs), chunk):
            rows = np.arange(start, min(start + chunk, len(pairs)))
            users = tower(*_history_tensors(pairs.context, rows, item_emb))
            top = torch.topk(users @ item_emb.T, k=min(k, item_emb.shape[0]), dim=1).indices.cpu().numpy()
            hits += int((top == pairs.targets[rows][:, None]).any(axis=1).sum())
    return hits / max(1, len(pairs))


def choose_tower(
    tower: UserTower,
    pooling: UserTower,
    item_emb: torch.Tensor,
    holdout: TrainingPairs,
    k: int,
    hist: FinetuneHistory,
) -> None:
    """Keep the learned tower only if it beats plain recency pooling on held-out pairs; otherwise
    load the pooling weights into `tower` (ties go to pooling: the simpler model)."""
    learned = pair_recall(tower.eval(), item_emb, holdout, k)
    plain = pair_recall(pooling.eval(), item_emb, holdout, k)
    hist.tower_holdout_recall = {"learned": learned, "pooling": plain}
    hist.tower_choice = "learned" if learned > plain else "pooling"
    if hist.tower_choice == "pooling":
        tower.load_state_dict(pooling.state_dict())
    log.info(
        "user tower on %d held-out pairs: Recall@%d learned %.4f vs recency pooling %.4f -> shipping %s",
        len(holdout),
        k,
        learned,
        plain,
        hist.tower_choice,
    )


def _first_trainable_layer(bert: nn.Module, trainable_layers: int | None) -> int | None:
    """Index of the lowest trained BERT layer, or None when every layer (and the embeddings) train."""
    n_layers = len(bert_layers(bert))
    if trainable_layers is None or trainable_layers >= n_layers:
        if trainable_layers is not None and trainable_layers > n_layers:
            log.info("trainable_layers %d >= the model's %d layers: training all", trainable_layers, n_layers)
        return None
    return n_layers - trainable_layers


def _check_config(cfg: EncoderConfig) -> None:
    for name in ("history_len", "batch_size", "grad_accum", "epochs"):
        if getattr(cfg, name) < 1:
            raise FinetuneError(f"EncoderConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.temperature <= 0:
        raise FinetuneError(f"EncoderConfig.temperature must be > 0, got {cfg.temperature}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise FinetuneError(f"EncoderConfig.max_steps must be >= 1 or None, got {cfg.max_steps}")
    if cfg.trainable_layers is not None and cfg.trainable_layers < 1:
        raise FinetuneError(
            f"EncoderConfig.trainable_layers must be >= 1 or None (all layers), got {cfg.trainable_layers}"
        )


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: object,
    state: dict,
    hist: FinetuneHistory,
    cfg: EncoderConfig,
) -> None:
    _atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": dict(state),
            "history": asdict(hist),
            "config": to_dict(cfg),
        },
        path,
    )


# ----------------------------------------------------------------------------- CLI


def fine_tune_windows(interactions: pl.DataFrame, split: SplitConfig) -> tuple[int, int, int]:
    """(T2, T1, T): fine-tune on < T2, validate on [T2, T1); T = start of the test period."""
    end = int(interactions.get_column("timestamp").max()) + 1
    t = end - int(split.test_days * DAY)
    t1 = t - int(split.valid_days * DAY)
    return t1 - int(split.valid_days * DAY), t1, t


def _parser() -> argparse.ArgumentParser:
    d = EncoderConfig()
    p = argparse.ArgumentParser(
        prog="python -m training.finetune",
        description="Fine-tune the BERT item encoder and the user tower on a canonical data folder. "
        "Works under `torchrun --nproc_per_node N -m training.finetune ...`.",
    )
    p.add_argument("--data", required=True, help="canonical data folder (interactions + items)")
    p.add_argument("--out", required=True, help="output folder: encoder/, user_tower.npz, checkpoints/")
    p.add_argument(
        "--test-days",
        type=float,
        default=SplitConfig().test_days,
        help="days held out as test (not used here); 0 = none",
    )
    p.add_argument(
        "--valid-days",
        type=float,
        default=SplitConfig().valid_days,
        help="validation window length in days (0 = no validation)",
    )
    p.add_argument(
        "--model-dir", default=None, help="starting BERT checkpoint (default: packaged all-MiniLM-L6-v2)"
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training pairs")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="cap on optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="BERT learning rate")
    p.add_argument("--tower-lr", type=float, default=d.tower_lr, help="user tower learning rate")
    p.add_argument("--history-len", type=int, default=d.history_len, help="items in a user context")
    p.add_argument("--max-train-pairs", type=int, default=d.max_train_pairs, help="most recent pairs kept")
    p.add_argument(
        "--hard-negatives", type=int, default=d.hard_negatives, help="mined neighbours per positive"
    )
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="optimizer steps between validations")
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument(
        "--tower-refit-steps", type=int, default=d.tower_refit_steps, help="tower-only steps at the end"
    )
    p.add_argument(
        "--tower-init-half-life-days",
        type=float,
        default=d.tower_init_half_life_days,
        help="the tower starts as event-weight x recency mean pooling with this half-life",
    )
    p.add_argument(
        "--tower-holdout-pairs",
        type=int,
        default=d.tower_holdout_pairs,
        help="most recent pairs held out of the refit; the tower ships only if it beats pooling on them (0 = off)",
    )
    p.add_argument(
        "--trainable-layers",
        type=int,
        default=d.trainable_layers,
        help="train only the top N BERT layers from cached lower-layer states (default: all layers)",
    )
    p.add_argument("--valid-max-users", type=int, default=d.valid_max_users, help="validation users sampled")
    p.add_argument(
        "--precision",
        default=d.precision,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast precision",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument(
        "--rank-checksums", action="store_true", help="each rank writes OUT/checksum-rank<R>.txt (DDP check)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    from training.data import DataValidationError, load_dataset

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = replace(
        EncoderConfig(),
        model_dir=args.model_dir, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, tower_lr=args.tower_lr, history_len=args.history_len,
        max_train_pairs=args.max_train_pairs, hard_negatives=args.hard_negatives, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, tower_refit_steps=args.tower_refit_steps,
        tower_init_half_life_days=args.tower_init_half_life_days, tower_holdout_pairs=args.tower_holdout_pairs,
        valid_max_users=args.valid_max_users, precision=args.precision, seed=args.seed,
        trainable_layers=args.trainable_layers,
    )  # fmt: skip
    try:
        data = load_dataset(args.data)
        t2, t1, _ = fine_tune_windows(data.interactions, SplitConfig(args.test_days, args.valid_days))
        ts = pl.col("timestamp")
        train = (
            data.interactions.filter(ts < t2) if args.valid_days > 0 else data.interactions.filter(ts < t1)
        )
        valid = data.interactions.filter((ts >= t2) & (ts < t1)) if args.valid_days > 0 else None
        result = finetune(
            train,
            data.items,
            cfg,
            TextConfig(),
            args.out,
            valid=valid,
            progress=not args.no_progress,
            resume=args.resume,
        )
    except (DataValidationError, FinetuneError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.rank_checksums:
        Path(args.out, f"checksum-rank{rank}.txt").write_text(
            f"{result.weights_checksum} {_embedding_checksum(result)}\n"
        )
    if rank == 0:
        mean_step = np.mean(result.history.step_seconds) if result.history.step_seconds else float("nan")
        print(
            f"fine-tuned {result.steps} steps on {result.n_pairs} pairs in {result.seconds:.1f}s "
            f"({mean_step:.3f} s/step); valid recall before {result.valid_recall_before} after {result.valid_recall_after}; "
            f"encoder -> {result.encoder_dir}, tower -> {result.tower_path}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _embedding_checksum(result: FinetuneResult) -> str:
    """Checksum of the final item embeddings (= encoder weights applied to the catalogue)."""
    return hashlib.sha256(np.ascontiguousarray(result.item_embeddings).tobytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
