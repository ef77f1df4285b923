"""Compiled (numba) loops behind the per-candidate text features of `recsvc.features`.

Why compiled: at serving batch sizes the numpy version is dozens of small calls per request, each
holding the GIL, so a server's event loop and its compute thread take turns on one core. These
kernels run with the GIL released (`nogil`), and fuse the gather of a candidate's embedding with
all its dot products (one pass over memory instead of one per history item). The numpy
definition they replace is kept in tests/recsvc/test_features.py as the reference they are
checked against.

Gathers from large catalogues: a candidate's row of an item table is a cache miss once the table
outgrows the cache, and a loop that computes as it gathers takes those misses one after another.
So each kernel first touches the rows of a block of candidates (`BLOCK`) in a loop of independent
loads, which the CPU overlaps, and then computes on rows already in cache: at 1M items x 64 dims
`text_cosines` went from 0.14 to 0.06 ms per request of 500 candidates (no change at 10k items).
The touch loops return a throwaway sum, so the compiler cannot drop their loads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Candidates whose rows are touched ahead of computing on them: 64 rows of 384 float32 (96 KB) stay
# well inside a core's L2.
BLOCK = 64


@njit(nogil=True, cache=True, inline="always")
def _touch_rows(table: np.ndarray, items: np.ndarray, start: int, stop: int) -> float:  # pragma: no cover
    """Load one value of every cache line of table[items[start:stop]] (see the module docstring)."""
    warm = 0.0
    width = table.shape[1]
    for i in range(start, stop):
        row = table[items[i]]
        for d in range(0, width, 16):  # 16 float32 per 64-byte line
            warm += row[d]
    return warm


# reassoc lets LLVM vectorise the dot products (a different summation order from BLAS: equal to
# it within float32 rounding, and the same in training and serving, which both call this).
@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, inline="always")
def _dots4(
    r0: np.ndarray, r1: np.ndarray, r2: np.ndarray, r3: np.ndarray, other: np.ndarray, dim: int
) -> tuple[float, float, float, float]:  # pragma: no cover - compiled
    """Four candidates' products with one vector: each load of `other` feeds four multiply-adds
    (one product per load pair held the kernel at the CPU's load rate, not its arithmetic rate)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for d in range(dim):
        o = other[d]
        a0 += r0[d] * o
        a1 += r1[d] * o
        a2 += r2[d] * o
        a3 += r3[d] * o
    return a0, a1, a2, a3


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, inline="always")
def _dots4x2(
    r0: np.ndarray, r1: np.ndarray, r2: np.ndarray, r3: np.ndarray, x: np.ndarray, y: np.ndarray, dim: int
) -> tuple[float, float, float, float, float, float, float, float]:  # pragma: no cover - compiled
    """`_dots4` with two vectors at once: six loads feed eight multiply-adds."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    b0 = np.float32(0.0)
    b1 = np.float32(0.0)
    b2 = np.float32(0.0)
    b3 = np.float32(0.0)
    for d in range(dim):
        xd = x[d]
        yd = y[d]
        a0 += r0[d] * xd
        a1 += r1[d] * xd
        a2 += r2[d] * xd
        a3 += r3[d] * xd
        b0 += r0[d] * yd
        b1 += r1[d] * yd
        b2 += r2[d] * yd
        b3 += r3[d] * yd
    return a0, a1, a2, a3, b0, b1, b2, b3


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
) -> float:  # pragma: no cover - compiled; covered through build_features
    """Fill out[:, columns] = (cos_user, cos_hist_max, cos_hist_mean, cos_hist_last) per candidate.

    Segment r (request r) holds candidate rows bounds[r]:bounds[r+1] and recent history items
    recent[recent_bounds[r]:recent_bounds[r+1]] (oldest first); rows of a request without a
    user vector keep cos_user, and without history the cos_hist_* columns, untouched (nan).

    Candidates go four at a time, against the user vector (`_dots4`) and two history rows at a
    time (`_dots4x2`). A request's last group repeats its last candidate, and an odd last history
    row is paired with itself (computed, not written), so every product comes out of the same
    code whatever its position: the bits never depend on the batch, the list around a candidate
    or where an item sits in the recent history.
    """
    c_user, c_max, c_mean, c_last = columns[0], columns[1], columns[2], columns[3]
    dim = item_emb.shape[1]
    warm = 0.0
    for r in range(len(bounds) - 1):
        h0, h1 = recent_bounds[r], recent_bounds[r + 1]
        n_hist = h1 - h0
        use_user = has_user[r]
        if not use_user and n_hist == 0:
            continue
        end = bounds[r + 1]
        for b0 in range(bounds[r], end, BLOCK):
            b1 = min(b0 + BLOCK, end)
            warm += _touch_rows(item_emb, items, b0, b1)
            for i in range(b0, b1, 4):
                r0 = item_emb[items[i]]
                r1 = item_emb[items[min(i + 1, end - 1)]]
                r2 = item_emb[items[min(i + 2, end - 1)]]
                r3 = item_emb[items[min(i + 3, end - 1)]]
                m = min(4, end - i)
                if use_user:
                    s0, s1, s2, s3 = _dots4(r0, r1, r2, r3, user_vecs[r], dim)
                    _put4(out, i, m, c_user, s0, s1, s2, s3)
                if n_hist:
                    m0 = m1 = m2 = m3 = np.float32(-np.inf)
                    t0 = t1 = t2 = t3 = np.float32(0.0)
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for j in range(h0, h1, 2):
                        # two history rows per pass; an odd last one is paired with itself
                        p = _dots4x2(
                            r0, r1, r2, r3, item_emb[recent[j]], item_emb[recent[min(j + 1, h1 - 1)]], dim
                        )
                        for half in range(min(2, h1 - j)):
                            s0, s1, s2, s3 = p[4 * half], p[4 * half + 1], p[4 * half + 2], p[4 * half + 3]
                            if s0 > m0:
                                m0 = s0
                            if s1 > m1:
                                m1 = s1
                            if s2 > m2:
                                m2 = s2
                            if s3 > m3:
                                m3 = s3
                            t0 += s0
                            t1 += s1
                            t2 += s2
                            t3 += s3
                    n = np.float32(n_hist)
                    _put4(out, i, m, c_max, m0, m1, m2, m3)
                    _put4(out, i, m, c_mean, t0 / n, t1 / n, t2 / n, t3 / n)
                    _put4(out, i, m, c_last, s0, s1, s2, s3)
    return warm


@njit(nogil=True, cache=True, inline="always")
def _put4(
    out: np.ndarray, i: int, m: int, column: int, v0: float, v1: float, v2: float, v3: float
) -> None:  # pragma: no cover - compiled
    """out[i:i+m, column] = (v0, v1, v2, v3)[:m]: a group's values, padding dropped."""
    out[i, column] = v0
    if m > 1:
        out[i + 1, column] = v1
    if m > 2:
        out[i + 2, column] = v2
    if m > 3:
        out[i + 3, column] = v3


@njit(nogil=True, cache=True)
def history_affinity(
    out: np.ndarray,
    attr_columns: np.ndarray,
    summary_columns: np.ndarray,
    ui_columns: np.ndarray,
    codes: tuple,  # type: ignore[type-arg]  # one int code array per attribute (-1 = missing)
    value_offsets: np.ndarray,
    hist_offsets: np.ndarray,
    hist_items: np.ndarray,
    hist_ts: np.ndarray,
    hist_weights: np.ndarray,
    hist_decayed: np.ndarray,
    bounds: np.ndarray,
    items: np.ndarray,
    row_now: np.ndarray,
    divisor: np.ndarray,
    day: float,
    slot: np.ndarray,
) -> float:  # pragma: no cover - compiled; covered through build_features
    """The user-item affinity columns of every candidate: attr{j}_share, attr_share_mean / _max
    (`summary_columns`) and ui_count, ui_weight, ui_decayed, ui_days_since_last (`ui_columns`).

    Request r's history events are hist_offsets[r]:hist_offsets[r+1] (float64 weights and
    decayed weights), its candidates bounds[r]:bounds[r+1]. Sums run over the events in history
    order, as the numpy definition's bincounts do. `slot` is item-indexed scratch, all -1 on entry
    and on return.
    """
    n_attr = len(value_offsets) - 1
    acc = np.zeros(value_offsets[n_attr], np.float64)
    n_hist = len(hist_items)
    counts = np.zeros(n_hist, np.int64)
    weight_sums = np.zeros(n_hist, np.float64)
    decayed_sums = np.zeros(n_hist, np.float64)
    last = np.zeros(n_hist, np.float64)
    warm = 0.0
    for r in range(len(bounds) - 1):
        h0, h1 = hist_offsets[r], hist_offsets[r + 1]
        c0, c1 = bounds[r], bounds[r + 1]
        for i in range(c0, c1):  # touch first (module docstring)
            item = items[i]
            warm += slot[item]
            for a in range(n_attr):
                warm += codes[a][item]
        if n_attr:
            for e in range(h0, h1):
                for a in range(n_attr):
                    code = codes[a][hist_items[e]]
                    if code >= 0:
                        acc[value_offsets[a] + code] += hist_weights[e]
            for i in range(c0, c1):
                known = 0
                total = np.float32(0.0)
                best = np.float32(-1.0)
                for a in range(n_attr):
                    code = codes[a][items[i]]
                    if h1 == h0 or code < 0:
                        share = np.float32(np.nan)
                    else:
                        share = np.float32(acc[value_offsets[a] + code] / divisor[r])
                    if a < len(attr_columns):
                        out[i, attr_columns[a]] = share
                    if np.isfinite(share):
                        known += 1
                        total += share
                        best = max(best, share)
                if known:
                    out[i, summary_columns[0]] = np.float64(total) / np.float64(known)
                    out[i, summary_columns[1]] = best
            for e in range(h0, h1):
                for a in range(n_attr):
                    code = codes[a][hist_items[e]]
                    if code >= 0:
                        acc[value_offsets[a] + code] = 0.0
        m = 0
        for e in range(h0, h1):
            item = hist_items[e]
            g = slot[item]
            if g < 0:
                g = m
                slot[item] = m
                counts[g] = 0
                weight_sums[g] = 0.0
                decayed_sums[g] = 0.0
                last[g] = -np.inf
                m += 1
            counts[g] += 1
            weight_sums[g] += hist_weights[e]
            decayed_sums[g] += hist_decayed[e]
            last[g] = max(last[g], np.float64(hist_ts[e]))
        for i in range(c0, c1):
            g = slot[items[i]] if h1 > h0 else -1
            if g >= 0:
                out[i, ui_columns[0]] = np.float32(counts[g])
                out[i, ui_columns[1]] = np.float32(weight_sums[g])
                out[i, ui_columns[2]] = np.float32(decayed_sums[g])
                out[i, ui_columns[3]] = (np.float64(row_now[i]) - last[g]) / day
            else:
                out[i, ui_columns[0]] = 0.0
                out[i, ui_columns[1]] = 0.0
                out[i, ui_columns[2]] = 0.0
        for e in range(h0, h1):
            slot[hist_items[e]] = -1
    return warm


@njit(nogil=True, cache=True)
def item_columns(
    out: np.ndarray,
    stat_first: int,
    time_columns: np.ndarray,
    source_first: int,
    source_bits: np.ndarray,
    price_columns: np.ndarray,
    items: np.ndarray,
    sources: np.ndarray,
    row_now: np.ndarray,
    bounds: np.ndarray,
    stat_table: np.ndarray,
    first_ts: np.ndarray,
    last_ts: np.ndarray,
    price: np.ndarray,
    user_price: np.ndarray,
    day: float,
) -> float:  # pragma: no cover - compiled; covered through build_features
    """Per candidate: its item-behaviour row, days since its last / first event, one 0/1 column
    per source plus their count, its price and its ratio to the user's mean price (nan mean:
    left nan)."""
    n_stats = stat_table.shape[1]
    warm = 0.0
    for r in range(len(bounds) - 1):
        mean = user_price[r]
        for i in range(bounds[r], bounds[r + 1]):  # touch first (module docstring)
            item = items[i]
            warm += stat_table[item, 0] + last_ts[item] + first_ts[item] + price[item]
        for i in range(bounds[r], bounds[r + 1]):
            item = items[i]
            for j in range(n_stats):
                out[i, stat_first + j] = stat_table[item, j]
            now = np.float64(row_now[i])
            out[i, time_columns[0]] = (now - last_ts[item]) / day
            out[i, time_columns[1]] = (now - first_ts[item]) / day
            n = np.float32(0.0)
            for j in range(len(source_bits)):
                has = np.float32(1.0) if sources[i] & source_bits[j] else np.float32(0.0)
                out[i, source_first + j] = has
                n += has
            out[i, source_first + len(source_bits)] = n
            out[i, price_columns[0]] = price[item]
            if not np.isnan(mean):
                out[i, price_columns[1]] = price[item] / mean
    return warm


@njit(nogil=True, cache=True)
def _pairwise_sum(values: np.ndarray, lo: int, n: int) -> float:  # pragma: no cover - compiled
    """values[lo:lo+n].sum() as numpy computes it (its pairwise summation: blocks of up to 128 in
    eight interleaved partial sums), so the bits equal numpy's."""
    if n < 8:
        total = values.dtype.type(0.0)
        for i in range(lo, lo + n):
            total += values[i]
        return total
    if n <= 128:
        r0, r1, r2, r3 = values[lo], values[lo + 1], values[lo + 2], values[lo + 3]
        r4, r5, r6, r7 = values[lo + 4], values[lo + 5], values[lo + 6], values[lo + 7]
        i = 8
        while i < n - n % 8:
            r0 += values[lo + i]
            r1 += values[lo + i + 1]
            r2 += values[lo + i + 2]
            r3 += values[lo + i + 3]
            r4 += values[lo + i + 4]
            r5 += values[lo + i + 5]
            r6 += values[lo + i + 6]
            r7 += values[lo + i + 7]
            i += 8
        total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            total += values[lo + i]
            i += 1
        return total
    half = n // 2
    half -= half % 8
    return _pairwise_sum(values, lo, half) + _pairwise_sum(values, lo + half, n - half)


@njit(nogil=True, cache=True)
def segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """values[offsets[u]:offsets[u+1]].sum() for every segment u, bit-equal to numpy's."""
    out = np.zeros(len(offsets) - 1, values.dtype)
    for u in range(len(offsets) - 1):
        out[u] = _pairwise_sum(values, offsets[u], offsets[u + 1] - offsets[u])
    return out


@njit(nogil=True, cache=True)
def _distinct(values: np.ndarray) -> int:  # pragma: no cover - compiled
    """len(np.unique(values))."""
    if len(values) == 0:
        return 0
    ordered = np.sort(values)
    count = 1
    for i in range(1, len(ordered)):
        if ordered[i] != ordered[i - 1]:
            count += 1
    return count


@njit(nogil=True, cache=True)
def user_activity(
    out: np.ndarray,
    offsets: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    weight_sums: np.ndarray,
    nows: np.ndarray,
    codes: np.ndarray,
    day: int,
) -> None:  # pragma: no cover - compiled; covered through build_features
    """out[u] = behaviour.user_behaviour of user u (events offsets[u]:offsets[u+1], their
    float32 weight sum in weight_sums[u]): the same values, for a block of users in one pass.
    `codes` are the diversity attribute's codes per item, or empty when the catalogue has none."""
    for u in range(len(offsets) - 1):
        a, b = offsets[u], offsets[u + 1]
        n = b - a
        if n == 0:
            out[u, :3] = 0.0
            out[u, 3:] = np.nan
            continue
        now = nows[u]
        recent = 0
        for i in range(a, b):
            if now - timestamps[i] <= 7 * day:
                recent += 1
        days = np.empty(n, np.int64)
        for i in range(n):
            days[i] = timestamps[a + i] // day
        out[u, 0] = n
        out[u, 1] = weight_sums[u]
        out[u, 2] = recent
        out[u, 3] = (now - timestamps[b - 1]) / day
        out[u, 4] = _distinct(days)
        out[u, 5] = _distinct(items[a:b]) / n
        if len(codes) == 0:
            out[u, 6] = np.nan
        else:
            present = np.empty(n, np.int64)
            m = 0
            for i in range(a, b):
                code = codes[items[i]]
                if code >= 0:
                    present[m] = code
                    m += 1
            out[u, 6] = _distinct(present[:m]) / n
