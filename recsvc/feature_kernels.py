"""Compiled (numba) loops behind the per-candidate text features of `recsvc.features`.

Why compiled: at serving batch sizes the numpy version is dozens of small calls per request, each
holding the GIL, so a server's event loop and its compute thread take turns on one core. These
kernels run with the GIL released (`nogil`), and fuse the gather of a candidate's embedding with
all its dot products (one pass over memory instead of one per history item). The numpy
definition they replace is kept in tests/recsvc/test_features.py as the reference they are
checked against.
"""

from __future__ import annotations

import numpy as np
from numba import njit


# reassoc lets LLVM vectorise the dot products (a different summation order from BLAS: equal to
# it within float32 rounding, and the same in training and serving, which both call this).
@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def text_cosines(
    out: np.ndarray,
    columns: np.ndarray,
    items: np.ndarray,
    bounds: np.ndarray,
    user_vecs: np.ndarray,
    has_user: np.ndarray,
    recent: np.ndarray,
    recent_bounds: np.ndarray,
    item_emb: np.ndarray,
) -> None:  # pragma: no cover - compiled; covered through build_features
    """Fill out[:, columns] = (cos_user, cos_hist_max, cos_hist_mean, cos_hist_last) per candidate.

    Segment r (request r) holds candidate rows bounds[r]:bounds[r+1] and recent history items
    recent[recent_bounds[r]:recent_bounds[r+1]] (oldest first); rows of a request without a
    user vector keep cos_user, and without history the cos_hist_* columns, untouched (nan).
    """
    c_user, c_max, c_mean, c_last = columns[0], columns[1], columns[2], columns[3]
    dim = item_emb.shape[1]
    for r in range(len(bounds) - 1):
        h0, h1 = recent_bounds[r], recent_bounds[r + 1]
        n_hist = h1 - h0
        use_user = has_user[r]
        if not use_user and n_hist == 0:
            continue
        for i in range(bounds[r], bounds[r + 1]):
            row = item_emb[items[i]]
            if use_user:
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += row[d] * user_vecs[r, d]
                out[i, c_user] = acc
            if n_hist:
                best = np.float32(-np.inf)
                total = np.float32(0.0)
                sim = np.float32(0.0)
                for j in range(h0, h1):
                    other = item_emb[recent[j]]
                    sim = np.float32(0.0)
                    for d in range(dim):
                        sim += row[d] * other[d]
                    if sim > best:
                        best = sim
                    total += sim
                out[i, c_max] = best
                out[i, c_mean] = total / np.float32(n_hist)
                out[i, c_last] = sim
