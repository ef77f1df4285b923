"""User tower: a learned pooling over PRECOMPUTED item embeddings.

Why: a user is represented by the embeddings of their last items, which the bundle already holds,
so serving a request costs one small numpy attention over <= history_len vectors — no BERT run per
request, no per-user state to retrain. Training uses the torch module (`UserTower`); serving uses
`user_vector` / `user_vectors`, the same maths in numpy (tested equal to 1e-5).

Maths, for history items i (most recent first) with embedding h_i, age a_i (s) and weight w_i:
    logit_i = (h_i · q) / sqrt(d) + age_coef · log1p(a_i / 1 day) + age_days_coef · a_i / 1 day
              + weight_coef · log(w_i) + pos_i
    p = h-weighted softmax(logit) pooling:  pooled = Σ softmax(logit)_i h_i
    user = normalise(pooled + pooled @ W + b)
The residual linear map starts at zero, so an untrained tower is attention-weighted mean pooling:
plain mean by default, or with `UserTower.recency_pooling(...)` exactly the event-weight x
exponential-recency mean pooling of the `raw_encoder` baseline (weight_coef = 1, age_days_coef =
-ln 2 / half-life), so training starts from that strong baseline instead of below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numba import njit
from torch import nn

DAY_S = 86_400.0
MIN_WEIGHT = 1e-6
_PARAM_KEYS = ("query", "age_coef", "weight_coef", "position_bias", "linear", "bias", "age_days_coef")
# Arrays added after the first bundle format: absent in older user_tower.npz files, read as zero.
_OPTIONAL_KEYS = ("age_days_coef",)


class TowerParamsError(ValueError):
    """A user_tower.npz file is missing or malformed."""


def _age_feature(ages_s: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(ages_s, torch.Tensor):
        return torch.log1p(ages_s.clamp(min=0.0) / DAY_S)
    return np.log1p(np.maximum(ages_s, 0.0) / DAY_S).astype(np.float32)


def _weight_feature(weights: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(weights, torch.Tensor):
        return torch.log(weights.clamp(min=MIN_WEIGHT))
    return np.log(np.maximum(weights, MIN_WEIGHT)).astype(np.float32)


class UserTower(nn.Module):
    """Trainable tower; inputs are batches of padded histories with a validity mask."""

    def __init__(self, dim: int, history_len: int) -> None:
        super().__init__()
        self.dim = dim
        self.history_len = history_len
        self.query = nn.Parameter(torch.zeros(dim))
        self.age_coef = nn.Parameter(torch.zeros(()))
        self.weight_coef = nn.Parameter(torch.zeros(()))
        self.position_bias = nn.Parameter(torch.zeros(history_len))
        self.linear = nn.Parameter(torch.zeros(dim, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.age_days_coef = nn.Parameter(torch.zeros(()))

    @classmethod
    def recency_pooling(cls, dim: int, history_len: int, half_life_days: float) -> UserTower:
        """A tower that computes normalise(Σ w_i · 2^(-a_i / half-life) · h_i): the raw-encoder
        baseline's user vector. Fine-tuning starts here, so it can only move away from a good point."""
        if half_life_days <= 0:
            raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
        tower = cls(dim, history_len)
        with torch.no_grad():
            tower.weight_coef.fill_(1.0)
            tower.age_days_coef.fill_(-math.log(2.0) / half_life_days)
        return tower

    def forward(
        self, hist_emb: torch.Tensor, ages_s: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """hist_emb [B, L, d], ages_s/weights/mask [B, L] -> user vectors [B, d], L2-normalised.

        Rows with an all-False mask give a zero vector (callers skip them).
        """
        length = hist_emb.shape[1]
        if length > self.history_len:
            raise ValueError(f"history length {length} exceeds the tower's history_len {self.history_len}")
        hist_emb = hist_emb.float()
        logits = (
            hist_emb @ self.query / math.sqrt(self.dim)
            + self.age_coef * _age_feature(ages_s.float())
            + self.age_days_coef * (ages_s.float().clamp(min=0.0) / DAY_S)
            + self.weight_coef * _weight_feature(weights.float())
            + self.position_bias[:length]
        )
        logits = logits.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(logits, dim=1).nan_to_num(0.0)
        pooled = (attn.unsqueeze(-1) * hist_emb).sum(dim=1)
        out = pooled + pooled @ self.linear + self.bias * mask.any(dim=1, keepdim=True)
        return nn.functional.normalize(out, p=2, dim=-1)

    def to_params(self) -> TowerParams:
        state = {k: v.detach().cpu().float().numpy().copy() for k, v in self.state_dict().items()}
        return TowerParams(**{k: state[k] for k in _PARAM_KEYS})

    @classmethod
    def from_params(cls, params: TowerParams) -> UserTower:
        tower = cls(params.dim, params.history_len)
        tower.load_state_dict({k: torch.from_numpy(np.asarray(getattr(params, k))) for k in _PARAM_KEYS})
        return tower


@dataclass(frozen=True)
class TowerParams:
    """The tower's weights as numpy arrays: what a bundle stores and serving uses."""

    query: np.ndarray  # [d]
    age_coef: np.ndarray  # scalar
    weight_coef: np.ndarray  # scalar
    position_bias: np.ndarray  # [history_len]
    linear: np.ndarray  # [d, d]
    bias: np.ndarray  # [d]
    age_days_coef: np.ndarray = field(default_factory=lambda: np.zeros((), np.float32))  # scalar

    @property
    def dim(self) -> int:
        return int(self.query.shape[0])

    @property
    def history_len(self) -> int:
        return int(self.position_bias.shape[0])


def save_params(params: TowerParams, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        np.savez(fh, **{k: np.asarray(getattr(params, k), dtype=np.float32) for k in _PARAM_KEYS})
    return out


def load_params(path: str | Path) -> TowerParams:
    src = Path(path)
    if not src.is_file():
        raise TowerParamsError(f"user tower file {src} does not exist")
    try:
        with np.load(src) as data:
            missing = [k for k in _PARAM_KEYS if k not in data.files and k not in _OPTIONAL_KEYS]
            if missing:
                raise TowerParamsError(f"user tower file {src} lacks array(s): {', '.join(missing)}")
            arrays = {
                k: data[k].astype(np.float32) if k in data.files else np.zeros((), np.float32)
                for k in _PARAM_KEYS
            }
    except (OSError, ValueError) as exc:
        if isinstance(exc, TowerParamsError):
            raise
        raise TowerParamsError(f"user tower file {src} is not a readable .npz: {exc}") from exc
    d = arrays["query"].shape
    if len(d) != 1 or arrays["linear"].shape != (d[0], d[0]) or arrays["bias"].shape != d:
        raise TowerParamsError(f"user tower file {src} has inconsistent shapes")
    return TowerParams(**arrays)


def user_vectors(
    params: TowerParams,
    hist_emb: np.ndarray,
    ages_s: np.ndarray,
    weights: np.ndarray,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Batched numpy tower: hist_emb [B, L, d], ages_s/weights/mask [B, L] -> float32 [B, d].

    Rows whose mask is all False come back as zero vectors.
    """
    hist = np.asarray(hist_emb, dtype=np.float32)
    batch, length, dim = hist.shape
    if length > params.history_len:
        hist, ages_s, weights = (
            hist[:, : params.history_len],
            ages_s[:, : params.history_len],
            weights[:, : params.history_len],
        )
        mask = None if mask is None else mask[:, : params.history_len]
        length = params.history_len
    valid = np.ones((batch, length), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    logits = (
        hist @ params.query / np.float32(math.sqrt(dim))
        + params.age_coef * _age_feature(np.asarray(ages_s, dtype=np.float32))
        + params.age_days_coef * (np.maximum(np.asarray(ages_s, dtype=np.float32), 0.0) / np.float32(DAY_S))
        + params.weight_coef * _weight_feature(np.asarray(weights, dtype=np.float32))
        + params.position_bias[:length]
    ).astype(np.float32)
    logits = np.where(valid, logits, -np.inf)
    top = np.max(logits, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    expo = np.where(valid, np.exp(logits - top), 0.0).astype(np.float32)
    total = expo.sum(axis=1, keepdims=True)
    attn = np.divide(expo, total, out=np.zeros_like(expo), where=total > 0)
    pooled = np.einsum("bl,bld->bd", attn, hist).astype(np.float32)
    out = pooled + pooled @ params.linear + params.bias * valid.any(axis=1, keepdims=True)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0).astype(np.float32)


def user_vector(
    params: TowerParams, hist_emb: np.ndarray, ages_s: np.ndarray, weights: np.ndarray
) -> np.ndarray | None:
    """One user: hist_emb [L, d] (most recent first), ages_s [L], weights [L] -> float32 [d].

    Returns None for an empty history so the caller falls back (popularity, session items, ...).
    Histories longer than the tower's history_len are cut to the most recent items. Computed by
    `_tower_kernel` (the maths of `user_vectors` for one row, compiled: every request and every
    training example calls this, and the numpy version cost ~45 us of call overhead per user).
    """
    hist = np.asarray(hist_emb, dtype=np.float32)
    if hist.ndim != 2 or hist.shape[0] == 0:
        return None
    return _tower_kernel(
        np.ascontiguousarray(hist),
        np.ascontiguousarray(ages_s, dtype=np.float32),
        np.ascontiguousarray(weights, dtype=np.float32),
        np.ascontiguousarray(params.query, dtype=np.float32),
        np.float32(params.age_coef),
        np.float32(params.age_days_coef),
        np.float32(params.weight_coef),
        np.ascontiguousarray(params.position_bias, dtype=np.float32),
        np.ascontiguousarray(params.linear, dtype=np.float32),
        np.ascontiguousarray(params.bias, dtype=np.float32),
    )


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _tower_kernel(
    hist: np.ndarray,
    ages: np.ndarray,
    weights: np.ndarray,
    query: np.ndarray,
    age_coef: np.float32,
    age_days_coef: np.float32,
    weight_coef: np.float32,
    position_bias: np.ndarray,
    linear: np.ndarray,
    bias: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled; tested against user_vectors and the torch tower
    length = min(hist.shape[0], len(position_bias))
    dim = hist.shape[1]
    day = np.float32(DAY_S)
    scale = np.float32(math.sqrt(dim))
    logits = np.empty(length, np.float32)
    for i in range(length):
        dot = np.float32(0.0)
        for d in range(dim):
            dot += hist[i, d] * query[d]
        age = max(ages[i], np.float32(0.0))
        logits[i] = (
            dot / scale
            + age_coef * np.float32(np.log1p(age / day))
            + age_days_coef * (age / day)
            + weight_coef * np.float32(np.log(max(weights[i], np.float32(MIN_WEIGHT))))
            + position_bias[i]
        )
    top = logits.max()
    expo = np.empty(length, np.float32)
    total = np.float32(0.0)
    for i in range(length):
        expo[i] = np.exp(logits[i] - top)
        total += expo[i]
    pooled = np.zeros(dim, np.float32)
    for i in range(length):
        attn = expo[i] / total
        for d in range(dim):
            pooled[d] += attn * hist[i, d]
    out = pooled + bias
    for j in range(dim):
        for k in range(dim):
            out[k] += pooled[j] * linear[j, k]
    norm = np.float32(0.0)
    for k in range(dim):
        norm += out[k] * out[k]
    norm = np.sqrt(norm)
    if norm > 0:
        return out / norm
    return np.zeros(dim, np.float32)
