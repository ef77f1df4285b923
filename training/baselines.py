"""Comparison baselines behind one `CandidateGenerator` protocol, and their hyper-parameter tuning.

Every baseline ranks the full catalogue: first its own "personal" list for the user (nothing
for popularity, the user's items for repeat_pop, co-purchase neighbours for item-kNN, dot
products for ALS), then recent popularity fills the list up to k. Unknown users therefore get
popularity. All scoring is vectorised over batches of users with scipy.sparse / numpy, so the
whole H&M week (69k users, 105k items) takes seconds to tens of seconds per system.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsvc.config import DAY, BaselineConfig
from training.metrics import PAD

log = logging.getLogger(__name__)

CANDIDATE_SCHEMA: dict[str, Any] = {
    "user_id": pl.Utf8,
    "item_id": pl.Utf8,
    "rank": pl.Int32,
    "score": pl.Float32,
    "sources": pl.Utf8,
}
TRAIN_COLUMNS = ("user_id", "item_id", "timestamp", "weight")
POPULAR = "popular"


@runtime_checkable
class CandidateGenerator(Protocol):
    """What the evaluation harness needs from a system (docs/ARCHITECTURE.md, Evaluation)."""

    name: str

    def fit(self, train: pl.DataFrame, items: pl.DataFrame) -> None: ...

    def recommend(self, user_ids: list[str], k: int, exclude_seen: bool) -> pl.DataFrame: ...


# ---------------------------------------------------------------------------------------------
# Pure helpers


def decay(ages_s: np.ndarray, half_life_days: float) -> np.ndarray:
    """Exponential time decay 0.5 ** (age / half-life); ages in seconds, half-life in days."""
    if half_life_days <= 0:
        raise ValueError(f"half-life must be positive, got {half_life_days} days")
    return np.power(0.5, np.maximum(ages_s, 0) / (half_life_days * DAY)).astype(np.float32)


def top_k_per_row(matrix: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest stored entries, best first: (columns int64[n, k], scores float32[n, k]).

    Missing entries are PAD / -inf. Ties break by lower column index so results are deterministic.
    """
    matrix = sp.csr_matrix(matrix)
    n = matrix.shape[0]
    items = np.full((n, k), PAD, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if matrix.nnz == 0 or k == 0:
        return items, scores
    rows = np.repeat(np.arange(n), np.diff(matrix.indptr))
    order = np.lexsort((matrix.indices, -matrix.data, rows))
    rows_sorted = rows[order]
    position = np.arange(order.size) - matrix.indptr[rows_sorted]
    keep = position < k
    items[rows_sorted[keep], position[keep]] = matrix.indices[order][keep]
    scores[rows_sorted[keep], position[keep]] = matrix.data[order][keep]
    return items, scores


def popularity_order(
    item_idx: np.ndarray,
    timestamps: np.ndarray,
    weights: np.ndarray,
    n_items: int,
    end_ts: int,
    window_days: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Catalogue order by summed event weight in the last `window_days` before `end_ts`.

    Ties (and items outside the window) are broken by all-time weight, then catalogue order, so
    the order covers every item. Returns (order int64[n_items], window scores float32[n_items]).
    """
    in_window = timestamps > end_ts - window_days * DAY
    recent = np.bincount(item_idx[in_window], weights=weights[in_window], minlength=n_items)
    total = np.bincount(item_idx, weights=weights, minlength=n_items)
    order = np.lexsort((np.arange(n_items), -total, -recent))
    return order.astype(np.int64), recent.astype(np.float32)


def fill_with_popular(
    personal_items: np.ndarray,
    personal_scores: np.ndarray,
    popular: np.ndarray,
    popular_scores: np.ndarray,
    k: int,
    blocked: sp.csr_matrix | None,
    n_items: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Personal items first, then the most popular items not already listed nor `blocked`.

    `personal_items` rows hold valid items left-aligned, PAD after. `blocked` (same rows) marks
    items that must not be filled in (the user's seen items when they are excluded). Returns
    (items int64[n, k], scores float32[n, k], is_personal bool[n, k]); PAD only if the catalogue
    runs out.
    """
    n = personal_items.shape[0]
    personal_items = personal_items[:, :k]
    width = personal_items.shape[1]
    items = np.full((n, k), PAD, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    items[:, :width] = personal_items
    scores[:, :width] = personal_scores[:, :k]
    is_personal = items != PAD
    n_personal = is_personal.sum(axis=1)

    rows_p, cols_p = np.nonzero(is_personal)
    block_rows, block_items = [rows_p], [items[rows_p, cols_p]]
    if blocked is not None:
        blocked = sp.csr_matrix(blocked)
        block_rows.append(np.repeat(np.arange(n), np.diff(blocked.indptr)))
        block_items.append(blocked.indices.astype(np.int64))
    block_row = np.concatenate(block_rows)
    keys = np.unique(block_row.astype(np.int64) * n_items + np.concatenate(block_items))
    per_row_blocked = np.bincount(keys // n_items, minlength=n) if keys.size else np.zeros(n, np.int64)

    depth = int(min(popular.size, k + (per_row_blocked.max() if n else 0)))
    candidates = np.broadcast_to(popular[:depth], (n, depth))
    cand_keys = np.arange(n, dtype=np.int64)[:, None] * n_items + candidates
    if keys.size:
        pos = np.minimum(np.searchsorted(keys, cand_keys), keys.size - 1)
        free = keys[pos] != cand_keys
    else:
        free = np.ones((n, depth), dtype=bool)
    taken_so_far = np.cumsum(free, axis=1)
    need = (k - n_personal)[:, None]
    take = free & (taken_so_far <= need)
    rows_f, cols_f = np.nonzero(take)
    slot = n_personal[rows_f] + taken_so_far[rows_f, cols_f] - 1
    items[rows_f, slot] = candidates[rows_f, cols_f]
    scores[rows_f, slot] = popular_scores[candidates[rows_f, cols_f]]
    return items, scores, is_personal


def candidate_frame(
    user_ids: Sequence[str],
    items: np.ndarray,
    scores: np.ndarray,
    is_personal: np.ndarray,
    source: str,
    catalogue_ids: pl.Series,
) -> pl.DataFrame:
    """Dense per-user arrays -> the candidate frame every system returns (ARCHITECTURE.md)."""
    valid = items != PAD
    rows, cols = np.nonzero(valid)
    users = pl.Series("user_id", list(user_ids), dtype=pl.Utf8)
    return pl.DataFrame(
        {
            "user_id": users.gather(rows),
            "item_id": catalogue_ids.gather(items[rows, cols]),
            "rank": pl.Series(cols + 1, dtype=pl.Int32),
            "score": pl.Series(scores[rows, cols], dtype=pl.Float32),
            "sources": pl.Series(np.where(is_personal[rows, cols], source, POPULAR), dtype=pl.Utf8),
        },
        schema=CANDIDATE_SCHEMA,
    )


# ---------------------------------------------------------------------------------------------
# Fitted interaction state shared by the baselines


@dataclass
class InteractionData:
    """Train interactions as index arrays plus the catalogue / user id maps."""

    catalogue_ids: pl.Series  # item id per catalogue index
    user_ids: pl.Series  # user id per train user row
    user_row: dict[str, int]
    user_idx: np.ndarray  # per event
    item_idx: np.ndarray  # per event
    timestamps: np.ndarray
    weights: np.ndarray
    end_ts: int  # newest train timestamp: "now" for recency

    @property
    def n_items(self) -> int:
        return len(self.catalogue_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @classmethod
    def build(cls, train: pl.DataFrame, items: pl.DataFrame) -> InteractionData:
        missing = [c for c in TRAIN_COLUMNS if c not in train.columns]
        if missing:
            raise ValueError(f"train interactions lack column(s) {', '.join(missing)}")
        if "item_id" not in items.columns:
            raise ValueError("items lack column item_id")
        if train.height == 0:
            raise ValueError("train interactions are empty: nothing to fit a baseline on")
        catalogue = items.select(pl.col("item_id").cast(pl.Utf8)).with_row_index("item_idx")
        users = train.select(pl.col("user_id").unique(maintain_order=True)).with_row_index("user_idx")
        joined = (
            train.select(TRAIN_COLUMNS)
            .join(catalogue, on="item_id", how="left")
            .join(users, on="user_id", how="left")
        )
        unknown = joined.filter(pl.col("item_idx").is_null())
        if unknown.height:
            examples = ", ".join(unknown["item_id"].unique().head(5).to_list())
            raise ValueError(
                f"{unknown.height} train interaction(s) reference item_id(s) missing from the catalogue "
                f"(e.g. {examples})"
            )
        user_ids = users["user_id"]
        return cls(
            catalogue_ids=catalogue["item_id"],
            user_ids=user_ids,
            user_row={u: i for i, u in enumerate(user_ids.to_list())},
            user_idx=joined["user_idx"].to_numpy().astype(np.int64),
            item_idx=joined["item_idx"].to_numpy().astype(np.int64),
            timestamps=joined["timestamp"].to_numpy().astype(np.int64),
            weights=joined["weight"].fill_null(0.0).to_numpy().astype(np.float32),
            end_ts=int(joined["timestamp"].max()),  # type: ignore[arg-type]
        )

    def user_item_matrix(self, values: np.ndarray) -> sp.csr_matrix:
        """Users x items, `values` summed per (user, item), plus one empty row for unknown users."""
        m = sp.csr_matrix(
            (values, (self.user_idx, self.item_idx)), shape=(self.n_users + 1, self.n_items), dtype=np.float32
        )
        m.sum_duplicates()
        return m

    def rows_for(self, user_ids: Sequence[str]) -> np.ndarray:
        """Train row per requested user; unknown users map to the empty last row."""
        unknown = self.n_users
        return np.fromiter(
            (self.user_row.get(u, unknown) for u in user_ids), dtype=np.int64, count=len(user_ids)
        )


# ---------------------------------------------------------------------------------------------
# Baselines


class PopularityFilled:
    """Base for systems that rank "personal list, then popular fill" (subclass and override
    `_fit_model` / `_personal`): fits the interaction state and popularity, batches users."""

    name = "base"
    source = POPULAR

    def __init__(self, popularity_window_days: float = 7.0, batch_users: int = 2048) -> None:
        self.popularity_window_days = popularity_window_days
        self.batch_users = batch_users
        self._data: InteractionData | None = None

    def fit(self, train: pl.DataFrame, items: pl.DataFrame) -> None:
        started = time.perf_counter()
        data = InteractionData.build(train, items)
        self._data = data
        self._seen = data.user_item_matrix(np.ones_like(data.weights))
        self._popular, self._popular_scores = popularity_order(
            data.item_idx,
            data.timestamps,
            data.weights,
            data.n_items,
            data.end_ts,
            self.popularity_window_days,
        )
        self._fit_model(data)
        log.info(
            "%s fitted on %d events, %d users, %d items in %.1fs",
            self.name,
            data.weights.size,
            data.n_users,
            data.n_items,
            time.perf_counter() - started,
        )

    def _fit_model(self, data: InteractionData) -> None:
        """Subclasses build their model here."""

    def _personal(self, rows: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """(items, scores) [len(rows), <=k] best first, PAD-padded; seen items already removed."""
        return np.full((rows.size, 0), PAD, dtype=np.int64), np.zeros((rows.size, 0), dtype=np.float32)

    def recommend(self, user_ids: list[str], k: int, exclude_seen: bool) -> pl.DataFrame:
        if self._data is None:
            raise RuntimeError(f"{self.name}: call fit() before recommend()")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        data = self._data
        rows = data.rows_for(user_ids)
        frames = []
        for start in range(0, rows.size, self.batch_users):
            batch = rows[start : start + self.batch_users]
            p_items, p_scores = self._personal(batch, k, exclude_seen)
            blocked = self._seen[batch] if exclude_seen else None
            items, scores, is_personal = fill_with_popular(
                p_items, p_scores, self._popular, self._popular_scores, k, blocked, data.n_items
            )
            frames.append(
                candidate_frame(
                    user_ids[start : start + self.batch_users],
                    items,
                    scores,
                    is_personal,
                    self.source,
                    data.catalogue_ids,
                )
            )
        if not frames:
            return pl.DataFrame(schema=CANDIDATE_SCHEMA)
        return pl.concat(frames)

    def _drop_seen(self, scores: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
        seen = self._seen[rows]
        scores = sp.csr_matrix(scores - scores.multiply(seen > 0))
        scores.eliminate_zeros()
        return scores


class PopularityBaseline(PopularityFilled):
    """Most bought/viewed items in the recent window, weighted by event weight; same for everyone."""

    name = "popularity"


class RepeatThenPopular(PopularityFilled):
    """The user's own items by recency-weighted count, then popular items (strong in fashion/grocery)."""

    name = "repeat_pop"
    source = "repeat"

    def __init__(
        self, repeat_half_life_days: float = 7.0, popularity_window_days: float = 7.0, batch_users: int = 2048
    ) -> None:
        super().__init__(popularity_window_days, batch_users)
        self.repeat_half_life_days = repeat_half_life_days

    def _fit_model(self, data: InteractionData) -> None:
        recency = decay(data.end_ts - data.timestamps, self.repeat_half_life_days)
        self._history = data.user_item_matrix(data.weights * recency)

    def _personal(self, rows: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        if exclude_seen:  # every personal item is a seen item
            return super()._personal(rows, k, exclude_seen)
        return top_k_per_row(self._history[rows], k)


def cooccurrence_similarity(user_items: sp.csr_matrix, neighbours: int) -> sp.csr_matrix:
    """Item x item cosine of co-occurrence in user histories, diagonal removed, top-`neighbours` per row."""
    user_items = sp.csr_matrix(user_items, dtype=np.float32)
    cooc = sp.csr_matrix(user_items.T @ user_items)
    norms = np.sqrt(np.asarray(cooc.diagonal(), dtype=np.float32))
    cooc.setdiag(0.0)
    cooc.eliminate_zeros()
    cooc = sp.coo_matrix(cooc)
    cooc.data = cooc.data / (norms[cooc.row] * norms[cooc.col])
    cooc = sp.csr_matrix(cooc)
    cols, sims = top_k_per_row(cooc, neighbours)
    keep = cols != PAD
    rows = np.nonzero(keep)[0]
    n = cooc.shape[0]
    return sp.csr_matrix((sims[keep], (rows, cols[keep])), shape=(n, n), dtype=np.float32)


class ItemKNN(PopularityFilled):
    """Item-to-item co-purchase CF: score(i) = sum over history items h of decay(h) * cos(h, i)."""

    name = "itemknn"
    source = "itemknn"

    def __init__(
        self,
        neighbours: int = 50,
        history_half_life_days: float = 3.0,
        cooc_half_life_days: float = 14.0,
        popularity_window_days: float = 7.0,
        batch_users: int = 2048,
    ) -> None:
        super().__init__(popularity_window_days, batch_users)
        self.neighbours = neighbours
        self.history_half_life_days = history_half_life_days
        self.cooc_half_life_days = cooc_half_life_days

    def _fit_model(self, data: InteractionData) -> None:
        ages = data.end_ts - data.timestamps
        cooc_weights = data.weights * decay(ages, self.cooc_half_life_days)
        self._similarity = cooccurrence_similarity(data.user_item_matrix(cooc_weights), self.neighbours)
        self._history = data.user_item_matrix(data.weights * decay(ages, self.history_half_life_days))

    def _personal(self, rows: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        scores = sp.csr_matrix(self._history[rows] @ self._similarity)
        if exclude_seen:
            scores = self._drop_seen(scores, rows)
        return top_k_per_row(scores, k)


class ALSBaseline(PopularityFilled):
    """Implicit-feedback matrix factorisation (implicit's CPU ALS) on items seen in train."""

    name = "als"
    source = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        iterations: int = 15,
        alpha: float = 1.0,
        threads: int = 2,
        seed: int = 42,
        popularity_window_days: float = 7.0,
        batch_users: int = 2048,
    ) -> None:
        super().__init__(popularity_window_days, batch_users)
        self.factors = factors
        self.regularization = regularization
        self.iterations = iterations
        self.alpha = alpha
        self.threads = threads
        self.seed = seed

    def _fit_model(self, data: InteractionData) -> None:
        from training.als_fit import als_factors

        # Items never interacted with have no signal (their factors solve to 0); leaving them out
        # makes fitting and scoring ~6x cheaper on H&M, and popularity fills after the ALS list.
        self._active = np.unique(data.item_idx)
        confidence = data.user_item_matrix(data.weights)[: data.n_users][:, self._active]
        user_factors, self._item_factors = als_factors(
            confidence,
            factors=self.factors,
            regularization=self.regularization,
            iterations=self.iterations,
            alpha=self.alpha,
            threads=self.threads,
            seed=self.seed,
        )
        self._user_factors = np.vstack([user_factors, np.zeros((1, self.factors), np.float32)])
        self._seen_active = self._seen[:, self._active]

    def _personal(self, rows: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        known = rows < len(self._user_factors) - 1
        items = np.full((rows.size, k), PAD, dtype=np.int64)
        scores = np.full((rows.size, k), -np.inf, dtype=np.float32)
        if not known.any():
            return items, scores
        dense = self._user_factors[rows[known]] @ self._item_factors.T
        if exclude_seen:
            seen = self._seen_active[rows[known]].tocoo()
            dense[seen.row, seen.col] = -np.inf
        top = min(k, dense.shape[1])
        part = np.argpartition(-dense, top - 1, axis=1)[:, :top]
        part_scores = np.take_along_axis(dense, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        best_scores = np.take_along_axis(part_scores, order, axis=1)
        valid = np.isfinite(best_scores)
        best_items = np.where(valid, self._active[best], PAD)
        # Left-align valid entries (only -inf ones, i.e. excluded items, can be invalid; they sort last).
        items[known, :top] = best_items
        scores[known, :top] = np.where(valid, best_scores, -np.inf)
        return items, scores


# Old private name, still imported by training/text_baseline.py.
_PopularityFilled = PopularityFilled

BASELINES: dict[str, Callable[..., CandidateGenerator]] = {
    "popularity": PopularityBaseline,
    "repeat_pop": RepeatThenPopular,
    "itemknn": ItemKNN,
    "als": ALSBaseline,
}


def baseline_params(name: str, config: BaselineConfig) -> dict[str, Any]:
    """Constructor arguments of baseline `name` taken from the config section."""
    common = {"popularity_window_days": config.popularity_window_days, "batch_users": config.batch_users}
    specific: dict[str, dict[str, Any]] = {
        "popularity": {},
        "repeat_pop": {"repeat_half_life_days": config.repeat_half_life_days},
        "itemknn": {
            "neighbours": config.knn_neighbours,
            "history_half_life_days": config.knn_history_half_life_days,
            "cooc_half_life_days": config.knn_cooc_half_life_days,
        },
        "als": {
            "factors": config.als_factors,
            "regularization": config.als_regularization,
            "iterations": config.als_iterations,
            "alpha": config.als_alpha,
            "threads": config.als_threads,
            "seed": config.seed,
        },
    }
    if name not in specific:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return {**common, **specific[name]}


def make_baseline(name: str, config: BaselineConfig | None = None, **overrides: Any) -> CandidateGenerator:
    """Baseline `name` with config defaults, `overrides` (e.g. tuned values) on top."""
    params = baseline_params(name, config or BaselineConfig())
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(f"baseline {name!r} has no parameter(s) {', '.join(sorted(unknown))}")
    return BASELINES[name](**{**params, **overrides})


# ---------------------------------------------------------------------------------------------
# Tuning on the validation window


@dataclass(frozen=True)
class TuneResult:
    """Best parameters found on the validation window, with every trial for the record."""

    params: dict[str, Any]
    score: float
    metric: str
    mode: str
    cutoff: int
    trials: list[tuple[dict[str, Any], float]]


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a {param: values} grid, in a stable order; {} gives one empty point."""
    names = sorted(grid)
    for name in names:
        if len(grid[name]) == 0:
            raise ValueError(f"grid for {name!r} is empty")
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def tune(
    system_factory: Callable[..., CandidateGenerator],
    grid: Mapping[str, Sequence[Any]],
    train: pl.DataFrame,
    items: pl.DataFrame,
    valid_days: float,
    *,
    metric: str = "map@12",
    mode: str = "all",
    max_users: int | None = None,
    seed: int = 42,
) -> TuneResult:
    """Pick the grid point with the best `metric` when trained on train' and scored on the last
    `valid_days` of `train` (the test period is never looked at)."""
    from training.evaluate import evaluate_system
    from training.split import holdout_cutoff, time_split

    cutoff = holdout_cutoff(train, valid_days)
    split = time_split(train, cutoff)
    if split.train.height == 0 or split.test.height == 0:
        raise ValueError(
            f"validation split at {valid_days} day(s) leaves train'={split.train.height} rows and "
            f"valid={split.test.height} rows; need both non-empty to tune"
        )
    k = int(metric.split("@")[1]) if "@" in metric else 12
    trials: list[tuple[dict[str, Any], float]] = []
    for params in grid_points(grid):
        system = system_factory(**params)
        result = evaluate_system(
            system, split.train, split.test, items, ks=(k,), modes=(mode,), max_users=max_users, seed=seed
        )
        value = result["modes"][mode]["metrics"][metric]
        log.info("tune %s %s: %s=%.5f", system.name, params, metric, value)
        trials.append((params, float(value)))
    best_params, best = max(trials, key=lambda t: np.nan_to_num(t[1], nan=-np.inf))
    return TuneResult(params=best_params, score=best, metric=metric, mode=mode, cutoff=cutoff, trials=trials)
