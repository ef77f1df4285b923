"""THE ranker feature definition, imported by training (train_ranker) and serving (recommender).

One vectorised function per user turns (history, candidates, embeddings, behaviour state) into a
float32 matrix whose columns are FEATURE_NAMES. Missing values are nan (LightGBM routes them).
Changing a feature means changing it here only, so offline and online can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from recsvc.behaviour import USER_FEATURE_NAMES, ItemStats, decay
from recsvc.candidate_kernels import item_slots
from recsvc.candidates import SOURCE_BITS, SOURCE_NAMES, Candidates
from recsvc.catalog import Catalog
from recsvc.config import DAY, CandidateConfig
from recsvc.feature_kernels import history_affinity, item_columns, segment_sums, text_cosines, user_activity
from recsvc.history import HistoryRows, UserHistory

if TYPE_CHECKING:
    from recsvc.collaborative import CFModel

# Most recent history items compared by cosine with each candidate.
HISTORY_COS_ITEMS = 10
# Attribute affinity slots: the catalogue's first attributes (configured order, e.g. category, brand).
AFFINITY_SLOTS = 4

# Item behaviour columns that do not depend on the request time, kept as one table per ItemStats.
ITEM_STAT_COLUMNS: tuple[str, ...] = (
    "item_cnt_1d",
    "item_cnt_7d",
    "item_cnt_30d",
    "item_cnt_all",
    "item_users",
    "item_trend",
    "item_repurchase_rate",
)

FEATURE_NAMES: tuple[str, ...] = (
    # text interest
    "cos_user",
    "cos_hist_max",
    "cos_hist_mean",
    "cos_hist_last",
    "ann_score",
    "ann_rank",
    "cooc_score",
    "repeat_score",
    # collaborative filtering (ALS fold-in): nan without a user factor or for items nobody had
    "cf_score",
    "cf_rank",
    "cf_score_rel",
    # sources
    *(f"src_{name}" for name in SOURCE_NAMES),
    "n_sources",
    # item behaviour
    *ITEM_STAT_COLUMNS,
    "item_days_since_last",
    "item_days_since_first",
    # user behaviour
    *(f"user_{name}" for name in USER_FEATURE_NAMES),
    # user-item affinity
    *(f"attr{j}_share" for j in range(AFFINITY_SLOTS)),
    "attr_share_mean",
    "attr_share_max",
    "ui_count",
    "ui_weight",
    "ui_decayed",
    "ui_days_since_last",
    # price
    "item_price",
    "price_ratio_user_mean",
)
N_FEATURES = len(FEATURE_NAMES)
_COL = {name: j for j, name in enumerate(FEATURE_NAMES)}
_ATTR_COLUMNS = np.asarray([_COL[f"attr{j}_share"] for j in range(AFFINITY_SLOTS)])
_SUMMARY_COLUMNS = np.asarray([_COL["attr_share_mean"], _COL["attr_share_max"]])
_UI_COLUMNS = np.asarray([_COL[n] for n in ("ui_count", "ui_weight", "ui_decayed", "ui_days_since_last")])
_TIME_COLUMNS = np.asarray([_COL["item_days_since_last"], _COL["item_days_since_first"]])
_PRICE_COLUMNS = np.asarray([_COL["item_price"], _COL["price_ratio_user_mean"]])
_SOURCE_BITS = np.asarray([SOURCE_BITS[name] for name in SOURCE_NAMES], dtype=np.uint8)
_TEXT_COLUMNS = np.asarray([_COL[n] for n in ("cos_user", "cos_hist_max", "cos_hist_mean", "cos_hist_last")])
_NO_CODES = np.zeros(0, np.int32)  # a catalogue without attributes: no diversity


def item_stat_rows(stats: ItemStats, rows: np.ndarray) -> np.ndarray:
    """The ITEM_STAT_COLUMNS of catalogue items `rows` (float32 [len(rows), 7]).

    ItemStats caches this for all items and refreshes a row when an event updates it, so a
    request's item features are one gather.
    """
    counts = stats.counts[rows]
    users = stats.users[rows]
    week = counts[:, 1]
    table = np.empty((len(counts), len(ITEM_STAT_COLUMNS)), dtype=np.float32)
    table[:, :4] = counts
    table[:, 4] = users
    with np.errstate(divide="ignore", invalid="ignore"):
        table[:, 5] = np.where(week > 0, counts[:, 0] / (week / 7.0), np.nan)
        table[:, 6] = np.where(users > 0, stats.repeat_users[rows] / users, np.nan)
    return table


def feature_index(name: str) -> int:
    """Column of a feature in the matrix (KeyError names the unknown feature)."""
    return _COL[name]


def affinity_attributes(catalog: Catalog) -> list[str]:
    """Which catalogue attribute each attr{j}_share slot describes (for reports and plots)."""
    return list(catalog.attributes)[:AFFINITY_SLOTS]


def build_features(
    history: UserHistory,
    cands: Candidates,
    user_vec: np.ndarray | None,
    item_emb: np.ndarray,
    catalog: Catalog,
    stats: ItemStats,
    now: int,
    cfg: CandidateConfig,
    *,
    cf: CFModel | None = None,
    cf_user_factor: np.ndarray | None = None,
) -> np.ndarray:
    """Feature matrix float32 [len(cands), N_FEATURES] for one user at time `now`.

    `history` must contain only what was known before `now` (training passes histories cut at the
    cutoff; serving passes bundle history + events since), `item_emb` rows are L2-normalised.
    """
    return build_features_many(
        [history],
        [cands],
        [user_vec],
        item_emb,
        catalog,
        stats,
        [now],
        cfg,
        cf=cf,
        cf_user_factors=[cf_user_factor],
    )


def build_features_many(
    histories: Sequence[UserHistory],
    cands: Sequence[Candidates],
    user_vecs: Sequence[np.ndarray | None],
    item_emb: np.ndarray,
    catalog: Catalog,
    stats: ItemStats,
    nows: Sequence[int],
    cfg: CandidateConfig,
    *,
    cf: CFModel | None = None,
    cf_user_factors: Sequence[np.ndarray | None] | None = None,
    events: HistoryRows | None = None,
) -> np.ndarray:
    """`build_features` for many users at once: their matrices stacked in input order.
    `events`: `HistoryRows.of(histories, nows)` when the caller has it already.

    Why: per-user numpy calls cost more than the maths at serving batch sizes, so everything that
    is elementwise or a per-user sum is computed once over all candidates, with each row tagged by
    its user (segment). Every value is bit-identical to computing the users one by one: per-user
    sums accumulate in the same order, and dot products stay one matrix-vector product per user.
    """
    if not (len(histories) == len(cands) == len(user_vecs) == len(nows)):
        raise ValueError("histories, cands, user_vecs and nows must have the same length")
    sizes = np.fromiter((len(c) for c in cands), dtype=np.int64, count=len(cands))
    total = int(sizes.sum())
    out = np.full((total, N_FEATURES), np.nan, dtype=np.float32)
    if total == 0:
        return out
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    seg = np.repeat(np.arange(len(cands)), sizes)
    items = np.concatenate([c.items for c in cands]).astype(np.int64)
    row_now = np.repeat(np.asarray(nows, dtype=np.int64), sizes)
    _text_features(out, histories, cands, items, user_vecs, item_emb, bounds)
    _cf_features(out, cands, cf, cf_user_factors, bounds)
    _item_columns(out, cands, items, row_now, bounds, stats, catalog, histories)
    hist = HistoryRows.of(histories, nows) if events is None else events
    first = _COL["user_n_events"]
    out[:, first : first + len(USER_FEATURE_NAMES)] = _user_rows(hist, nows, catalog)[seg]
    _affinity_features(out, hist, bounds, items, row_now, catalog, cfg)
    return out


def _user_rows(hist: HistoryRows, nows: Sequence[int], catalog: Catalog) -> np.ndarray:
    """behaviour.user_behaviour of every user (`feature_kernels.user_activity`), float32
    [n_users, len(USER_FEATURE_NAMES)]; its diversity is over the catalogue's first attribute."""
    attributes = list(catalog.attributes.values())
    rows = np.empty((len(hist.offsets) - 1, len(USER_FEATURE_NAMES)), dtype=np.float32)
    user_activity(
        rows,
        hist.offsets,
        hist.items,
        hist.timestamps,
        segment_sums(hist.weights, hist.offsets),
        np.asarray(nows, dtype=np.int64),
        attributes[0] if attributes else _NO_CODES,
        DAY,
    )
    return rows


def _text_features(
    out: np.ndarray,
    histories: Sequence[UserHistory],
    cands: Sequence[Candidates],
    items: np.ndarray,
    user_vecs: Sequence[np.ndarray | None],
    item_emb: np.ndarray,
    bounds: np.ndarray,
) -> None:
    """cos_user and cos_hist_* of every candidate in one compiled pass (`text_cosines`)."""
    dim = item_emb.shape[1]
    vecs = np.zeros((len(cands), dim), dtype=np.float32)
    has_user = np.zeros(len(cands), dtype=np.bool_)
    for r, vec in enumerate(user_vecs):
        if vec is not None:
            vecs[r] = vec
            has_user[r] = True
    recent = [h.items[-HISTORY_COS_ITEMS:] for h in histories]
    recent_bounds = np.zeros(len(recent) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in recent], out=recent_bounds[1:])
    text_cosines(
        out,
        _TEXT_COLUMNS,
        items,
        bounds,
        vecs,
        has_user,
        np.concatenate(recent).astype(np.int64),
        recent_bounds,
        np.ascontiguousarray(item_emb, dtype=np.float32),
    )
    out[:, _COL["ann_score"]] = np.concatenate([c.ann_score for c in cands])
    out[:, _COL["ann_rank"]] = np.concatenate([c.ann_rank for c in cands])
    out[:, _COL["cooc_score"]] = np.concatenate([c.cooc_score for c in cands])
    out[:, _COL["repeat_score"]] = np.concatenate([c.repeat_score for c in cands])


def _cf_features(
    out: np.ndarray,
    cands: Sequence[Candidates],
    cf: CFModel | None,
    user_factors: Sequence[np.ndarray | None] | None,
    bounds: np.ndarray,
) -> None:
    """cf_score = user factor · item factor for every candidate (not only cf-proposed ones),
    cf_score_rel = that over the user's best candidate score (when positive), cf_rank from the source."""
    out[:, _COL["cf_rank"]] = np.concatenate([c.cf_rank for c in cands])
    if cf is None or user_factors is None:
        return
    for r, (c, factor) in enumerate(zip(cands, user_factors)):
        if factor is None or len(c) == 0:
            continue
        rows = slice(int(bounds[r]), int(bounds[r + 1]))
        score = cf.scores(factor, c.items)
        out[rows, _COL["cf_score"]] = score
        best = np.nanmax(score) if np.isfinite(score).any() else np.nan
        if best > 0:
            out[rows, _COL["cf_score_rel"]] = score / best


def pairwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [n, d] x b [k, d] -> [n, k] as k matrix-vector products.

    Why not `a @ b.T`: with faiss's OpenMP runtime loaded, small OpenBLAS sgemm calls can take
    ~10 ms on a busy few-core host (thread hand-off), while gemv stays in the tens of microseconds.
    """
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for j in range(b.shape[0]):
        out[:, j] = a @ b[j]
    return out


def _item_columns(
    out: np.ndarray,
    cands: Sequence[Candidates],
    items: np.ndarray,
    row_now: np.ndarray,
    bounds: np.ndarray,
    stats: ItemStats,
    catalog: Catalog,
    histories: Sequence[UserHistory],
) -> None:
    """Item behaviour, source and price columns in one compiled pass (`feature_kernels.item_columns`):
    the time-independent behaviour columns are one precomputed table (one gather per candidate),
    sources become 0/1 columns in SOURCE_NAMES order plus their count."""
    item_columns(
        out,
        _COL["item_cnt_1d"],
        _TIME_COLUMNS,
        _COL[f"src_{SOURCE_NAMES[0]}"],
        _SOURCE_BITS,
        _PRICE_COLUMNS,
        items,
        np.concatenate([c.sources for c in cands]),
        row_now,
        bounds,
        stats.derived_table(item_stat_rows),
        stats.first_ts,
        stats.last_ts,
        catalog.price,
        _user_mean_prices(histories, catalog),
        float(DAY),
    )


def _affinity_features(
    out: np.ndarray,
    hist: HistoryRows,
    bounds: np.ndarray,
    items: np.ndarray,
    row_now: np.ndarray,
    catalog: Catalog,
    cfg: CandidateConfig,
) -> None:
    """Attribute shares of the user's history weight and the user's own history with each item
    (`feature_kernels.history_affinity`; the numpy definition is the tests' reference)."""
    weights = hist.weights.astype(np.float64)
    # numpy's pairwise summation per user, so totals match the one-user definition exactly
    total = segment_sums(weights, hist.offsets)
    codes = tuple(catalog.attributes.values())
    value_offsets = np.zeros(len(codes) + 1, dtype=np.int64)
    np.cumsum([max(len(v), 1) for v in catalog.attribute_values.values()], out=value_offsets[1:])
    history_affinity(
        out,
        _ATTR_COLUMNS[: min(AFFINITY_SLOTS, len(codes))],
        _SUMMARY_COLUMNS,
        _UI_COLUMNS,
        codes if codes else (np.zeros(0, np.int32),),
        value_offsets,
        hist.offsets,
        hist.items,
        hist.timestamps,
        weights,
        weights * decay(hist.now - hist.timestamps, cfg.cooc_half_life_days),
        bounds,
        items,
        row_now,
        np.where(total > 0, total, 1.0),  # x / 1.0 == x: "no division" when total <= 0
        float(DAY),
        item_slots(len(catalog)),
    )


def _user_mean_prices(histories: Sequence[UserHistory], catalog: Catalog) -> np.ndarray:
    """Each user's mean known price as float32 (numpy's own mean per user); nan = no ratio."""
    means = np.full(len(histories), np.nan, dtype=np.float32)
    for r, history in enumerate(histories):
        if len(history):
            hist_price = catalog.price[history.items]
            known = np.isfinite(hist_price)
            if known.any():
                mean = hist_price[known].mean()
                if mean > 0:
                    means[r] = mean
    return means


def tower_inputs(
    history: UserHistory, item_emb: np.ndarray, now: int, history_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User-tower inputs from a history: the last `history_len` items, MOST RECENT FIRST, as
    (embeddings [L, d], ages in seconds [L], weights [L]); one definition for training and serving."""
    tail = slice(max(0, len(history) - history_len), len(history))
    items = history.items[tail][::-1]
    ages = np.maximum(now - history.timestamps[tail][::-1], 0).astype(np.float32)
    return item_emb[items], ages, history.weights[tail][::-1].astype(np.float32)
