"""THE ranker feature definition, imported by training (train_ranker) and serving (recommender).

One vectorised function per user turns (history, candidates, embeddings, behaviour state) into a
float32 matrix whose columns are FEATURE_NAMES. Missing values are nan (LightGBM routes them).
Changing a feature means changing it here only, so offline and online can never disagree.
"""

from __future__ import annotations

import numpy as np

from recsvc.behaviour import USER_FEATURE_NAMES, ItemStats, decay, user_behaviour
from recsvc.candidates import SOURCE_NAMES, Candidates
from recsvc.catalog import Catalog
from recsvc.config import DAY, CandidateConfig
from recsvc.history import UserHistory

# Most recent history items compared by cosine with each candidate.
HISTORY_COS_ITEMS = 10
# Attribute affinity slots: the catalogue's first attributes (configured order, e.g. category, brand).
AFFINITY_SLOTS = 4

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
    # sources
    *(f"src_{name}" for name in SOURCE_NAMES),
    "n_sources",
    # item behaviour
    "item_cnt_1d",
    "item_cnt_7d",
    "item_cnt_30d",
    "item_cnt_all",
    "item_users",
    "item_trend",
    "item_repurchase_rate",
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
) -> np.ndarray:
    """Feature matrix float32 [len(cands), N_FEATURES] for one user at time `now`.

    `history` must contain only what was known before `now` (training passes histories cut at the
    cutoff; serving passes bundle history + events since), `item_emb` rows are L2-normalised.
    """
    n = len(cands)
    out = np.full((n, N_FEATURES), np.nan, dtype=np.float32)
    if n == 0:
        return out
    items = cands.items
    cand_emb = item_emb[items]
    _text_features(out, history, cands, cand_emb, user_vec, item_emb)
    _source_features(out, cands)
    _item_features(out, items, stats, now)
    attributes = list(catalog.attributes.values())
    diversity_codes = attributes[0] if attributes else None
    out[:, _COL["user_n_events"] : _COL["user_n_events"] + len(USER_FEATURE_NAMES)] = user_behaviour(
        history, now, diversity_codes
    )
    _affinity_features(out, history, items, catalog, now, cfg)
    _price_features(out, history, items, catalog)
    return out


def _text_features(
    out: np.ndarray,
    history: UserHistory,
    cands: Candidates,
    cand_emb: np.ndarray,
    user_vec: np.ndarray | None,
    item_emb: np.ndarray,
) -> None:
    if user_vec is not None:
        out[:, _COL["cos_user"]] = cand_emb @ np.asarray(user_vec, dtype=np.float32)
    if len(history):
        recent = history.items[-HISTORY_COS_ITEMS:]
        sims = pairwise_dot(cand_emb, item_emb[recent])  # [n, k]
        out[:, _COL["cos_hist_max"]] = sims.max(axis=1)
        out[:, _COL["cos_hist_mean"]] = sims.mean(axis=1)
        out[:, _COL["cos_hist_last"]] = sims[:, -1]
    out[:, _COL["ann_score"]] = cands.ann_score
    out[:, _COL["ann_rank"]] = cands.ann_rank
    out[:, _COL["cooc_score"]] = cands.cooc_score
    out[:, _COL["repeat_score"]] = cands.repeat_score


def pairwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [n, d] x b [k, d] -> [n, k] as k matrix-vector products.

    Why not `a @ b.T`: with faiss's OpenMP runtime loaded, small OpenBLAS sgemm calls can take
    ~10 ms on a busy few-core host (thread hand-off), while gemv stays in the tens of microseconds.
    """
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for j in range(b.shape[0]):
        out[:, j] = a @ b[j]
    return out


def _source_features(out: np.ndarray, cands: Candidates) -> None:
    total = np.zeros(len(cands), dtype=np.float32)
    for name in SOURCE_NAMES:
        has = cands.has(name).astype(np.float32)
        out[:, _COL[f"src_{name}"]] = has
        total += has
    out[:, _COL["n_sources"]] = total


def _item_features(out: np.ndarray, items: np.ndarray, stats: ItemStats, now: int) -> None:
    counts = stats.counts[items]
    out[:, _COL["item_cnt_1d"] : _COL["item_cnt_all"] + 1] = counts
    users = stats.users[items]
    out[:, _COL["item_users"]] = users
    week = counts[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, _COL["item_trend"]] = np.where(week > 0, counts[:, 0] / (week / 7.0), np.nan)
        out[:, _COL["item_repurchase_rate"]] = np.where(users > 0, stats.repeat_users[items] / users, np.nan)
    out[:, _COL["item_days_since_last"]] = (now - stats.last_ts[items]) / DAY
    out[:, _COL["item_days_since_first"]] = (now - stats.first_ts[items]) / DAY


def _affinity_features(
    out: np.ndarray, history: UserHistory, items: np.ndarray, catalog: Catalog, now: int, cfg: CandidateConfig
) -> None:
    if len(history) == 0:
        out[:, _COL["ui_count"]] = 0.0
        out[:, _COL["ui_weight"]] = 0.0
        out[:, _COL["ui_decayed"]] = 0.0
        return
    w = history.weights.astype(np.float64)
    total = w.sum()
    shares = []
    for j, (name, codes) in enumerate(catalog.attributes.items()):
        hist_codes = codes[history.items]
        known = hist_codes >= 0
        per_value = np.bincount(hist_codes[known], w[known], minlength=len(catalog.attribute_values[name]))
        per_value = per_value / total if total > 0 else per_value
        cand_codes = codes[items]
        share = np.where(cand_codes >= 0, per_value[np.maximum(cand_codes, 0)], np.nan).astype(np.float32)
        shares.append(share)
        if j < AFFINITY_SLOTS:
            out[:, _COL[f"attr{j}_share"]] = share
    if shares:
        stacked = np.vstack(shares)
        finite = np.isfinite(stacked)
        n_known = finite.sum(axis=0)
        filled = np.where(finite, stacked, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, _COL["attr_share_mean"]] = np.where(n_known > 0, filled.sum(axis=0) / n_known, np.nan)
        out[:, _COL["attr_share_max"]] = np.where(
            n_known > 0, np.where(finite, stacked, -1.0).max(axis=0), np.nan
        )
    # how often / how much / how recently the user had this very item
    uniq, inverse = np.unique(history.items, return_inverse=True)
    count = np.bincount(inverse, minlength=len(uniq)).astype(np.float32)
    weight = np.bincount(inverse, w, minlength=len(uniq)).astype(np.float32)
    decayed = np.bincount(
        inverse, w * decay(now - history.timestamps, cfg.cooc_half_life_days), minlength=len(uniq)
    ).astype(np.float32)
    last = np.full(len(uniq), -np.inf)
    np.maximum.at(last, inverse, history.timestamps.astype(np.float64))
    pos = np.minimum(np.searchsorted(uniq, items), len(uniq) - 1)
    had = uniq[pos] == items
    out[:, _COL["ui_count"]] = np.where(had, count[pos], 0.0)
    out[:, _COL["ui_weight"]] = np.where(had, weight[pos], 0.0)
    out[:, _COL["ui_decayed"]] = np.where(had, decayed[pos], 0.0)
    out[:, _COL["ui_days_since_last"]] = np.where(had, (now - last[pos]) / DAY, np.nan)


def _price_features(out: np.ndarray, history: UserHistory, items: np.ndarray, catalog: Catalog) -> None:
    price = catalog.price[items]
    out[:, _COL["item_price"]] = price
    if len(history):
        hist_price = catalog.price[history.items]
        known = np.isfinite(hist_price)
        if known.any():
            mean = float(hist_price[known].mean())
            if mean > 0:
                out[:, _COL["price_ratio_user_mean"]] = price / mean


def tower_inputs(
    history: UserHistory, item_emb: np.ndarray, now: int, history_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User-tower inputs from a history: the last `history_len` items, MOST RECENT FIRST, as
    (embeddings [L, d], ages in seconds [L], weights [L]); one definition for training and serving."""
    tail = slice(max(0, len(history) - history_len), len(history))
    items = history.items[tail][::-1]
    ages = np.maximum(now - history.timestamps[tail][::-1], 0).astype(np.float32)
    return item_emb[items], ages, history.weights[tail][::-1].astype(np.float32)
