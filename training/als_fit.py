"""Fit ALS item factors with `implicit` on interactions strictly before a cutoff.

Serving only needs the item factors (recsvc/collaborative.py folds users in), so this is the one
place that imports `implicit`. The user-item confidence matrix is built with the same
`user_confidences` rule the fold-in uses, so a folded-in user equals implicit's own user solve.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp

from recsvc.behaviour import decay
from recsvc.collaborative import CFModel
from recsvc.config import CollaborativeConfig

log = logging.getLogger(__name__)


def confidence_matrix(
    item_idx: np.ndarray,
    user_idx: np.ndarray,
    ts: np.ndarray,
    weights: np.ndarray,
    n_items: int,
    cutoff: int,
    half_life_days: float,
) -> sp.csr_matrix:
    """users x items summed (decayed) event weight of events before `cutoff` (alpha applied by implicit)."""
    before = np.asarray(ts) < cutoff
    w = np.asarray(weights, dtype=np.float64)[before]
    if half_life_days > 0:
        w = w * decay(cutoff - np.asarray(ts, np.int64)[before], half_life_days)
    users = np.asarray(user_idx, dtype=np.int64)[before]
    n_users = int(users.max()) + 1 if len(users) else 0
    matrix = sp.csr_matrix(
        (w, (users, np.asarray(item_idx, dtype=np.int64)[before])), shape=(n_users, n_items), dtype=np.float64
    )
    matrix.sum_duplicates()
    return matrix.astype(np.float32)


def als_factors(
    confidence: sp.csr_matrix,
    *,
    factors: int,
    regularization: float,
    iterations: int,
    alpha: float,
    threads: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors) of implicit's CPU ALS on a users x items confidence matrix;
    the one place ALS is fitted, for the served cf source and the ALS baseline alike."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # implicit parallelises itself
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            alpha=alpha,
            num_threads=threads,
            random_state=seed,
        )
        model.fit(sp.csr_matrix(confidence, dtype=np.float32), show_progress=False)
    return (
        np.asarray(model.user_factors, dtype=np.float32),
        np.asarray(model.item_factors, dtype=np.float32),
    )


def fit_cf(
    item_idx: np.ndarray,
    user_idx: np.ndarray,
    ts: np.ndarray,
    weights: np.ndarray,
    n_items: int,
    cutoff: int,
    cfg: CollaborativeConfig,
) -> CFModel:
    """ALS on events < cutoff; items without events keep a zero factor (not searchable, nan score)."""
    start = time.perf_counter()
    matrix = confidence_matrix(item_idx, user_idx, ts, weights, n_items, cutoff, cfg.half_life_days)
    active = np.flatnonzero(np.diff(matrix.tocsc().indptr) > 0)
    factors = np.zeros((n_items, cfg.factors), np.float32)
    if len(active) and matrix.shape[0]:
        _, item_factors = als_factors(
            matrix[:, active],
            factors=cfg.factors,
            regularization=cfg.regularization,
            iterations=cfg.iterations,
            alpha=cfg.alpha,
            threads=cfg.threads,
            seed=cfg.seed,
        )
        factors[active] = item_factors
    log.info(
        "ALS item factors @%d: %d users, %d of %d items, %d factors in %.1fs",
        cutoff,
        matrix.shape[0],
        len(active),
        n_items,
        cfg.factors,
        time.perf_counter() - start,
    )
    return CFModel(
        factors, cfg.regularization, cfg.alpha, cfg.half_life_days, cfg.exact_max_items, cfg.ivf_nprobe
    )
