"""Collaborative filtering at serving time: ALS item factors + a numpy fold-in of the user.

Item factors are fitted offline with `implicit` (training/als_fit.py). A user's factor is
NOT stored: it is solved per request from their history by the same least-squares step implicit's
ALS uses for users, so serving needs no `implicit`, reflects events recorded since the bundle, and
training (features at T2/T1) and serving (at T) share one definition.

Implicit-ALS user step for confidences c_i > 0 on items i (preference 1), item factors Y:
    x_u = (YᵀY + λI + Σ_i (c_i − 1) y_i y_iᵀ)⁻¹ Σ_i c_i y_i
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from recsvc.behaviour import decay
from recsvc.history import UserHistory

FORMAT_VERSION = 1


def user_confidences(
    items: np.ndarray,
    timestamps: np.ndarray,
    weights: np.ndarray,
    now: int,
    alpha: float,
    half_life_days: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(distinct items, confidence) with confidence = alpha x summed event weight (decayed when
    half_life_days > 0): the value implicit's ALS sees in its user-item matrix."""
    w = np.asarray(weights, dtype=np.float64)
    if half_life_days > 0:
        w = w * decay(np.asarray(now, np.int64) - np.asarray(timestamps, np.int64), half_life_days)
    unique, inverse = np.unique(np.asarray(items, dtype=np.int64), return_inverse=True)
    return unique, alpha * np.bincount(inverse, w, minlength=len(unique))


def fold_in(
    item_factors: np.ndarray,
    gram: np.ndarray,
    items: np.ndarray,
    confidence: np.ndarray,
    regularization: float,
) -> np.ndarray:
    """The implicit-ALS least-squares user factor (float32 [f]) given fixed item factors.

    `gram` is YᵀY over all items (float64 [f, f]); `items` are distinct rows with confidence > 0.
    """
    y = np.asarray(item_factors[items], dtype=np.float64)
    c = np.asarray(confidence, dtype=np.float64)
    a = gram + regularization * np.eye(gram.shape[0]) + (y.T * (c - 1.0)) @ y
    b = y.T @ c
    return np.linalg.solve(a, b).astype(np.float32)


@dataclass
class CFModel:
    """Item factors (zero rows for items without interactions) and the fold-in settings."""

    item_factors: np.ndarray  # float32 [n_items, f]
    regularization: float
    alpha: float
    half_life_days: float
    exact_max_items: int = 50_000
    ivf_nprobe: int = 32
    gram: np.ndarray = field(init=False)  # float64 [f, f]
    active: np.ndarray = field(init=False)  # int64 rows with a non-zero factor (searchable)
    has_factor: np.ndarray = field(init=False)  # bool [n_items]
    _index: faiss.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_factors = np.ascontiguousarray(self.item_factors, dtype=np.float32)
        if self.item_factors.ndim != 2:
            raise ValueError(f"item_factors must be 2-D [n_items, factors], got {self.item_factors.shape}")
        y = self.item_factors.astype(np.float64)
        self.gram = y.T @ y
        self.has_factor = np.any(self.item_factors != 0, axis=1)
        self.active = np.flatnonzero(self.has_factor).astype(np.int64)
        self._index = _factor_index(self.item_factors[self.active], self.exact_max_items, self.ivf_nprobe)

    def user_factor(self, history: UserHistory, now: int) -> np.ndarray | None:
        """The user's factor at `now` from their history; None without any history on factored items."""
        if len(history) == 0:
            return None
        items, conf = user_confidences(
            history.items, history.timestamps, history.weights, now, self.alpha, self.half_life_days
        )
        known = (conf > 0) & self.has_factor[items]
        if not known.any():
            return None
        return fold_in(self.item_factors, self.gram, items[known], conf[known], self.regularization)

    def scores(self, user_factor: np.ndarray, items: np.ndarray) -> np.ndarray:
        """user · item for `items` (float32), nan for items without a factor (never interacted)."""
        out = self.item_factors[items] @ np.asarray(user_factor, dtype=np.float32)
        return np.where(self.has_factor[items], out, np.nan).astype(np.float32)

    def search_many(
        self, user_factors: list[np.ndarray | None], k: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k items per user (one index search for all), scores recomputed exactly and ties
        broken by item row so the result does not depend on the batch."""
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
        out: list[tuple[np.ndarray, np.ndarray]] = [empty] * len(user_factors)
        rows = [i for i, v in enumerate(user_factors) if v is not None]
        k = min(k, len(self.active))
        if not rows or k <= 0:
            return out
        queries = np.ascontiguousarray(np.vstack([user_factors[i] for i in rows]), dtype=np.float32)
        _, found = self._index.search(queries, k)
        for row, ids in zip(rows, found):
            items = self.active[ids[ids >= 0]].astype(np.int32)
            exact = self.item_factors[items] @ np.asarray(user_factors[row], dtype=np.float32)
            order = np.lexsort((items, -exact.astype(np.float64)))
            out[row] = (items[order], exact[order].astype(np.float32))
        return out

    def save(self, path: str | Path) -> None:
        np.savez(
            Path(path),
            format_version=np.int64(FORMAT_VERSION),
            item_factors=self.item_factors,
            regularization=np.float64(self.regularization),
            alpha=np.float64(self.alpha),
            half_life_days=np.float64(self.half_life_days),
            exact_max_items=np.int64(self.exact_max_items),
            ivf_nprobe=np.int64(self.ivf_nprobe),
        )

    @classmethod
    def load(cls, path: str | Path) -> CFModel:
        with np.load(Path(path)) as z:
            version = int(z["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"{path}: collaborative format {version} is not {FORMAT_VERSION}")
            return cls(
                z["item_factors"].astype(np.float32),
                float(z["regularization"]),
                float(z["alpha"]),
                float(z["half_life_days"]),
                int(z["exact_max_items"]),
                int(z["ivf_nprobe"]),
            )


def _factor_index(factors: np.ndarray, exact_max_items: int, nprobe: int) -> faiss.Index:
    """Inner-product index over item factors: exact when small, IVF-flat (nlist = 4 sqrt n) above,
    so a request never multiplies its factor with a million-row matrix."""
    d = factors.shape[1]
    n = len(factors)
    if n <= exact_max_items:
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(factors)
        index.nprobe = nprobe
    if n:
        index.add(np.ascontiguousarray(factors, dtype=np.float32))
    return index
