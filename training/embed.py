"""Embed the WHOLE catalogue (never-interacted items included) with a TextEncoder.

Cold-start items are only reachable through their text, so every item gets a vector; row i is
`items` row i, which is also catalogue row i in the bundle.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl

from recsvc.config import TextConfig
from recsvc.encoder import TextEncoder
from recsvc.text import item_texts

log = logging.getLogger(__name__)


def embed_catalogue(
    encoder: TextEncoder,
    items: pl.DataFrame,
    text_cfg: TextConfig,
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(item ids object[n], float32 [n, d] L2-normalised), in `items` row order."""
    if "item_id" not in items.columns:
        raise ValueError("items has no 'item_id' column")
    started = time.perf_counter()
    ids = items.get_column("item_id").cast(pl.Utf8).to_numpy().astype(object)
    emb = encoder.encode(item_texts(items, text_cfg), batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started
    log.info("embedded %d items in %.1fs (%.0f items/s)", len(ids), seconds, len(ids) / max(seconds, 1e-9))
    return ids, emb
