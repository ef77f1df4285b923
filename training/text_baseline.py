"""Text-encoder retrieval baseline: user = recency-weighted mean of history item embeddings.

It answers "how good is the encoder on its own?": with the raw MiniLM it is the "before
fine-tuning" baseline, with a fine-tuned encoder dir it isolates what fine-tuning bought, without
the user tower or the ranker. Catalogue embeddings are cached on disk keyed by (model files, text
config, catalogue text), because re-embedding 100k items on a CPU takes minutes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import scipy.sparse as sp

from recsvc.config import TextConfig, to_dict
from recsvc.encoder import TextEncoder, default_model_dir
from recsvc.text import item_texts
from training.baselines import PAD, InteractionData, PopularityFilled, decay

log = logging.getLogger(__name__)

CACHE_ENV = "RECSVC_CACHE_DIR"


def default_cache_dir() -> Path:
    """$RECSVC_CACHE_DIR or ~/.cache/recsvc, + /embeddings."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/recsvc")).expanduser() / "embeddings"


def model_fingerprint(model_dir: Path) -> dict[str, object]:
    """Path plus (name, size, mtime) of every file: a re-saved fine-tuned encoder gets a new key."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return {
        "dir": str(model_dir.resolve()),
        "files": [(str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    }


def embedding_cache_key(model_dir: Path, text_cfg: TextConfig, texts: list[str], precision: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([model_fingerprint(model_dir), to_dict(text_cfg), precision]).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def catalogue_cache_file(
    model_dir: str | Path | None,
    items: pl.DataFrame,
    text_cfg: TextConfig,
    precision: str,
    cache_dir: str | Path | None = None,
) -> Path:
    """Where the embeddings of `items` by this model, text config and RESOLVED precision live."""
    path = default_model_dir() if model_dir is None else Path(model_dir)
    key = embedding_cache_key(path, text_cfg, item_texts(items, text_cfg), precision)
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{key}.npy"


def _write_cache(file: Path, emb: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.parent / f"{file.stem}.{os.getpid()}.tmp.npy"
    np.save(tmp, np.ascontiguousarray(emb, dtype=np.float32))
    os.replace(tmp, file)


def store_catalogue_embeddings(
    model_dir: str | Path | None,
    items: pl.DataFrame,
    text_cfg: TextConfig,
    emb: np.ndarray,
    precision: str,
    cache_dir: str | Path | None = None,
) -> Path:
    """Put vectors computed elsewhere (fine-tuning's raw pass: the same `encode` call) into the
    cache under the key `cached_catalogue_embeddings` looks up, so later runs skip the pass."""
    if emb.shape[0] != items.height:
        raise ValueError(f"{emb.shape[0]} embeddings for {items.height} catalogue items")
    file = catalogue_cache_file(model_dir, items, text_cfg, precision, cache_dir)
    _write_cache(file, emb)
    log.info("stored %d raw-encoder embeddings in the cache at %s", emb.shape[0], file)
    return file


def cached_catalogue_embeddings(
    model_dir: str | Path | None,
    items: pl.DataFrame,
    text_cfg: TextConfig,
    *,
    batch_size: int = 256,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """float32 [n_items, d] for `items` rows, from the cache file when its key matches."""
    path = default_model_dir() if model_dir is None else Path(model_dir)
    texts = item_texts(items, text_cfg)
    encoder = TextEncoder.load(path, precision=precision, max_tokens=text_cfg.max_tokens)
    file = catalogue_cache_file(path, items, text_cfg, encoder.precision, cache_dir)
    if file.is_file():
        emb = np.load(file)
        if emb.shape == (len(texts), encoder.dim):
            log.info("catalogue embeddings from cache %s", file)
            return emb
        log.warning("ignoring cache file %s with shape %s", file, emb.shape)
    emb = encoder.encode(texts, batch_size=batch_size, progress=progress)
    _write_cache(file, emb)
    log.info("embedded %d items; cached at %s", len(texts), file)
    return emb


def recent_history_matrix(data: InteractionData, history_len: int, half_life_days: float) -> sp.csr_matrix:
    """Users(+1 empty row) x items: event weight x recency decay over each user's last `history_len` events."""
    order = np.lexsort((-data.timestamps, data.user_idx))  # by user, newest first
    users = data.user_idx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    first = np.zeros(users.size, dtype=np.int64)
    first[starts] = starts
    position = np.arange(users.size) - np.maximum.accumulate(first)
    keep = order[position < history_len]
    values = data.weights[keep] * decay(data.end_ts - data.timestamps[keep], half_life_days)
    m = sp.csr_matrix(
        (values, (data.user_idx[keep], data.item_idx[keep])),
        shape=(data.n_users + 1, data.n_items),
        dtype=np.float32,
    )
    m.sum_duplicates()
    return m


class EncoderRetrieval(PopularityFilled):
    """CandidateGenerator: FAISS inner product between user mean vectors and catalogue embeddings."""

    source = "encoder"

    def __init__(
        self,
        model_dir: str | Path | None = None,
        text_cfg: TextConfig | None = None,
        *,
        name: str = "encoder_raw",
        history_len: int = 20,
        history_half_life_days: float = 3.0,
        batch_size: int = 256,
        precision: str = "auto",
        cache_dir: str | Path | None = None,
        popularity_window_days: float = 7.0,
        batch_users: int = 2048,
        progress: bool = True,
    ) -> None:
        super().__init__(popularity_window_days, batch_users)
        self.name = name
        self.model_dir = model_dir
        self.text_cfg = text_cfg or TextConfig()
        self.history_len = history_len
        self.history_half_life_days = history_half_life_days
        self.batch_size = batch_size
        self.precision = precision
        self.cache_dir = cache_dir
        self.progress = progress
        self._items: pl.DataFrame | None = None

    def fit(self, train: pl.DataFrame, items: pl.DataFrame) -> None:
        self._items = items
        super().fit(train, items)

    def _fit_model(self, data: InteractionData) -> None:
        assert self._items is not None
        emb = cached_catalogue_embeddings(
            self.model_dir,
            self._items,
            self.text_cfg,
            batch_size=self.batch_size,
            precision=self.precision,
            cache_dir=self.cache_dir,
            progress=self.progress,
        )
        self.item_embeddings = np.ascontiguousarray(emb, dtype=np.float32)
        self._index = faiss.IndexFlatIP(emb.shape[1])
        self._index.add(self.item_embeddings)
        users = (
            recent_history_matrix(data, self.history_len, self.history_half_life_days) @ self.item_embeddings
        )
        norms = np.linalg.norm(users, axis=1, keepdims=True)
        self.user_vectors = np.divide(users, norms, out=np.zeros_like(users), where=norms > 0).astype(
            np.float32
        )

    def _personal(self, rows: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        items = np.full((rows.size, k), PAD, dtype=np.int64)
        scores = np.full((rows.size, k), -np.inf, dtype=np.float32)
        known = np.flatnonzero(np.linalg.norm(self.user_vectors[rows], axis=1) > 0)
        if known.size == 0:
            return items, scores
        seen = self._seen[rows[known]]
        depth = min(self._index.ntotal, k + (int(np.diff(seen.indptr).max()) if exclude_seen else 0))
        found_scores, found = self._index.search(self.user_vectors[rows[known]], depth)
        if exclude_seen:
            keys = np.arange(known.size)[:, None] * self._index.ntotal + found
            seen_coo = seen.tocoo()
            seen_keys = seen_coo.row.astype(np.int64) * self._index.ntotal + seen_coo.col
            found_scores = np.where(np.isin(keys, seen_keys) | (found < 0), -np.inf, found_scores)
        order = np.argsort(-found_scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(found, order, axis=1)
        top_scores = np.take_along_axis(found_scores, order, axis=1)
        valid = np.isfinite(top_scores)
        items[known, : top.shape[1]] = np.where(valid, top, PAD)
        scores[known, : top.shape[1]] = top_scores
        return items, scores
