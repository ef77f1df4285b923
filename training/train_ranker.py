"""Ranker training sets built strictly per docs/ARCHITECTURE.md "Time windows" (no leakage).

For a cutoff c and a label window [c, end): every piece of state (histories, ItemStats,
CoOccurrence, user vectors) comes from interactions < c only, candidates come from the same
sources serving uses, features from `recsvc.features.build_features` (the serving definition),
and the label of a candidate is the strongest event weight the user gave it in the window.

Training uses c = T2 with labels [T2, T1) (plus, with `RankerConfig.train_label_windows` > 1, the
windows before it: c = T2 - w, labels [T2 - w, T2), ...); validation (early stopping) c = T1 with
labels [T1, T).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from recsvc.behaviour import CoOccurrence, ItemStats
from recsvc.bundle import LoadedBundle
from recsvc.candidates import SOURCE_NAMES, Candidates, generate
from recsvc.catalog import Catalog
from recsvc.collaborative import CFModel
from recsvc.config import CandidateConfig, CollaborativeConfig, RankerConfig, TrainConfig, to_dict
from recsvc.features import FEATURE_NAMES, build_features, tower_inputs
from recsvc.history import HistoryStore, item_indices
from recsvc.retrieval import ranked_search
from recsvc.user_tower import TowerParams, user_vector

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    """What serving would know at `cutoff`: the leak-free inputs of candidates and features."""

    cutoff: int
    history: HistoryStore
    stats: ItemStats
    cooc: CoOccurrence
    cf: CFModel | None = None  # ALS item factors fitted on the same rows; None when disabled

    def bundle(
        self,
        *,
        path: Path,
        version: str,
        config: TrainConfig,
        catalog: Catalog,
        item_emb: np.ndarray,
        index: Any,
        tower: TowerParams,
        ranker: Any,
        encoder_dir: Path,
        novel_ranker: Any | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> LoadedBundle:
        """An in-memory bundle serving this state with the given model parts, as if loaded from a
        bundle published at `cutoff` (validation, tests and benchmarks that never write one)."""
        return LoadedBundle(
            path=Path(path),
            version=version,
            manifest={"data_end_ts": self.cutoff, "config": to_dict(config)}
            if manifest is None
            else manifest,
            config=config,
            catalog=catalog,
            item_embeddings=item_emb,
            index=index,
            tower=tower,
            ranker=ranker,
            history=self.history,
            item_stats=self.stats,
            cooccurrence=self.cooc,
            encoder_dir=Path(encoder_dir),
            data_end_ts=self.cutoff,
            cf=self.cf,
            novel_ranker=novel_ranker,
        )


@dataclass
class RankingDataset:
    """Grouped learning-to-rank rows: one group per user, rows = that user's candidates."""

    features: np.ndarray  # float32 [N, F]
    labels: np.ndarray  # float32 [N], strongest event weight in the label window, 0 = none
    groups: np.ndarray  # int64 [n_groups] group sizes
    user_ids: list[str]
    items: np.ndarray  # int32 [N]
    sources: np.ndarray  # uint8 [N]
    cutoff: int
    recall: dict[str, float] = field(default_factory=dict)  # label items found, per source + "all"
    feature_names: tuple[str, ...] = FEATURE_NAMES

    @property
    def n_rows(self) -> int:
        return len(self.labels)


def state_at(
    interactions: pl.DataFrame,
    catalog: Catalog,
    cutoff: int,
    cfg: CandidateConfig,
    cf_cfg: CollaborativeConfig | None = None,
) -> ServingState:
    """Histories, item stats, co-occurrence (and ALS item factors when `cf_cfg` enables them) from
    interactions strictly before `cutoff`."""
    before = interactions.filter(pl.col("timestamp") < cutoff)
    item_idx = item_indices(before["item_id"], catalog)
    known = item_idx >= 0
    before = before.filter(pl.Series(known))
    item_idx = item_idx[known]
    user_idx = before["user_id"].cast(pl.Utf8).cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    ts = before["timestamp"].to_numpy()
    weights = before["weight"].to_numpy().astype(np.float32)
    history = HistoryStore.from_arrays(
        before["user_id"].cast(pl.Utf8).to_numpy(), item_idx, ts, weights, catalog
    )
    stats = ItemStats.from_interactions(
        item_idx, user_idx, ts, weights, len(catalog), cutoff, cfg.popularity_window_days
    )
    cooc = CoOccurrence.from_interactions(
        item_idx, user_idx, ts, weights, len(catalog), cutoff, cfg.cooc_neighbours, cfg.cooc_half_life_days
    )
    cf = None
    if cf_cfg is not None and cf_cfg.enabled:
        from training.als_fit import fit_cf

        cf = fit_cf(item_idx, user_idx, ts, weights, len(catalog), cutoff, cf_cfg)
    return ServingState(cutoff, history, stats, cooc, cf)


def label_table(
    labels: pl.DataFrame, catalog: Catalog, start: int, end: int | None
) -> dict[str, dict[int, float]]:
    """user -> {item row: strongest event weight} for events in [start, end)."""
    window = labels.filter(pl.col("timestamp") >= start)
    if end is not None:
        window = window.filter(pl.col("timestamp") < end)
    idx = item_indices(window["item_id"], catalog)
    frame = (
        pl.DataFrame({"user_id": window["user_id"].cast(pl.Utf8), "item": idx, "weight": window["weight"]})
        .filter(pl.col("item") >= 0)
        .group_by("user_id", "item")
        .agg(pl.col("weight").max())
    )
    table: dict[str, dict[int, float]] = {}
    for user, item, weight in frame.iter_rows():
        table.setdefault(user, {})[int(item)] = float(weight)
    return table


def build_ranking_dataset(
    interactions: pl.DataFrame,
    labels: pl.DataFrame,
    *,
    cutoff: int,
    label_end: int | None,
    catalog: Catalog,
    item_emb: np.ndarray,
    index: Any,
    tower: TowerParams,
    cand_cfg: CandidateConfig,
    max_users: int,
    seed: int = 42,
    drop_groups_without_positive: bool = True,
    progress: bool = False,
    cf_cfg: CollaborativeConfig | None = None,
    exclude_owned: bool = False,
    state: ServingState | None = None,
) -> RankingDataset:
    """Candidates + features + labels for users active in [cutoff, label_end).

    `exclude_owned=True` builds the set that repeat_policy=exclude requests see: items the user
    had before `cutoff` are neither candidates nor labels (users without a new item are skipped).

    `interactions` may contain rows at/after `cutoff`: they are ignored for state (the test
    `test_features_ignore_interactions_at_or_after_cutoff` proves it). `index` is an
    `recsvc.retrieval.ItemIndex` (anything with `search(queries, k) -> (scores, ids)`).

    `state`, when given, is `state_at(interactions, catalog, cutoff, cand_cfg, cf_cfg)` already
    built (one ALS fit and co-occurrence count serve several sets at the same cutoff).
    """
    if state is None:
        state = state_at(interactions, catalog, cutoff, cand_cfg, cf_cfg)
    elif state.cutoff != cutoff:
        raise ValueError(f"state is at {state.cutoff}, not at the ranking set's cutoff {cutoff}")
    table = label_table(labels, catalog, cutoff, label_end)
    if exclude_owned:
        table = _without_owned(table, state.history)
    users = sorted(table)
    if len(users) > max_users:
        rng = np.random.default_rng(seed)
        users = sorted(rng.choice(np.asarray(users, dtype=object), size=max_users, replace=False).tolist())
    histories = [state.history.get(u) for u in users]
    vectors: list[np.ndarray | None] = []
    for h in histories:
        if len(h) == 0:
            vectors.append(None)
            continue
        emb, ages, w = tower_inputs(h, item_emb, cutoff, tower.history_len)
        vectors.append(user_vector(tower, emb, ages, w))
    ann = ranked_search(index, item_emb, vectors, min(cand_cfg.ann, len(catalog)))
    cf_factors: list[np.ndarray | None] = [
        state.cf.user_factor(h, cutoff) if state.cf is not None else None for h in histories
    ]
    cf_lists = state.cf.search_many(cf_factors, cand_cfg.cf) if state.cf is not None else None

    feats: list[np.ndarray] = []
    label_rows: list[np.ndarray] = []
    item_rows: list[np.ndarray] = []
    source_rows: list[np.ndarray] = []
    kept_users: list[str] = []
    found = dict.fromkeys(("all", *SOURCE_NAMES), 0)
    total_positive = 0
    loop = tqdm(range(len(users)), desc=f"ranking rows @ {cutoff}", disable=not progress, unit="user")
    for i in loop:
        user, history, vec = users[i], histories[i], vectors[i]
        ann_items, ann_scores = ann[i]
        cands = generate(
            history,
            ann_items=ann_items if vec is not None else None,
            ann_scores=ann_scores if vec is not None else None,
            stats=state.stats,
            cooc=state.cooc,
            cfg=cand_cfg,
            now=cutoff,
            cf_items=cf_lists[i][0] if cf_lists is not None and cf_factors[i] is not None else None,
            cf_scores=cf_lists[i][1] if cf_lists is not None and cf_factors[i] is not None else None,
        )
        if exclude_owned:
            cands = cands.take(~np.isin(cands.items, history.items))
        positives = table[user]
        y = np.asarray([positives.get(int(it), 0.0) for it in cands.items], dtype=np.float32)
        total_positive += len(positives)
        _count_recall(found, cands, y > 0)
        if len(cands) == 0 or (drop_groups_without_positive and not (y > 0).any()):
            continue
        feats.append(
            build_features(
                history,
                cands,
                vec,
                item_emb,
                catalog,
                state.stats,
                cutoff,
                cand_cfg,
                cf=state.cf,
                cf_user_factor=cf_factors[i],
            )
        )
        label_rows.append(y)
        item_rows.append(cands.items)
        source_rows.append(cands.sources)
        kept_users.append(user)
    recall = {name: found[name] / total_positive if total_positive else float("nan") for name in found}
    log.info(
        "ranking set @%d: %d/%d users kept, %d rows; candidate recall %s",
        cutoff,
        len(kept_users),
        len(users),
        sum(len(y) for y in label_rows),
        ", ".join(f"{k}={v:.3f}" for k, v in recall.items()),
    )
    return RankingDataset(
        features=np.vstack(feats) if feats else np.zeros((0, len(FEATURE_NAMES)), np.float32),
        labels=np.concatenate(label_rows) if label_rows else np.zeros(0, np.float32),
        groups=np.asarray([len(y) for y in label_rows], dtype=np.int64),
        user_ids=kept_users,
        items=np.concatenate(item_rows) if item_rows else np.zeros(0, np.int32),
        sources=np.concatenate(source_rows) if source_rows else np.zeros(0, np.uint8),
        cutoff=cutoff,
        recall=recall,
    )


def training_windows(t2: int, t1: int, data_start: int, n: int) -> list[tuple[int, int]]:
    """(cutoff, label end) of up to `n` consecutive training windows ending at T1, latest first.

    Every window is as long as [T2, T1) and keeps at least that much history before its cutoff.
    """
    if n < 1:
        raise ValueError(f"the number of training label windows must be >= 1, got {n}")
    width = t1 - t2
    if width <= 0:
        raise ValueError(f"T2 ({t2}) must be before T1 ({t1})")
    out = []
    for i in range(n):
        cutoff = t2 - i * width
        if i > 0 and cutoff - width < data_start:
            break
        out.append((cutoff, cutoff + width))
    return out


def concat_datasets(sets: Sequence[RankingDataset]) -> RankingDataset:
    """One grouped set from several windows (groups stay per user and window); the cutoff is the
    latest window's, `recall` that window's too (the one closest to what serving sees)."""
    if len(sets) == 1:
        return sets[0]
    latest = max(sets, key=lambda s: s.cutoff)
    return RankingDataset(
        features=np.vstack([s.features for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        groups=np.concatenate([s.groups for s in sets]),
        user_ids=[u for s in sets for u in s.user_ids],
        items=np.concatenate([s.items for s in sets]),
        sources=np.concatenate([s.sources for s in sets]),
        cutoff=latest.cutoff,
        recall=latest.recall,
    )


def _without_owned(table: dict[str, dict[int, float]], history: HistoryStore) -> dict[str, dict[int, float]]:
    """Label table minus the items each user already had (users left with none are dropped)."""
    out: dict[str, dict[int, float]] = {}
    for user, positives in table.items():
        owned = set(history.get(user).items.tolist())
        novel = {item: w for item, w in positives.items() if item not in owned}
        if novel:
            out[user] = novel
    return out


def grouped_ndcg(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> float:
    """Mean NDCG@k over groups with graded gains 2^grade - 1 (LightGBM's lambdarank metric)."""
    grades = relevance_grades(labels).astype(np.float64)
    gains = np.exp2(grades) - 1.0
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    total, n = 0.0, 0
    start = 0
    for size in groups.tolist():
        g = gains[start : start + size]
        s = np.asarray(scores[start : start + size], dtype=np.float64)
        start += size
        ideal = np.sort(g)[::-1][:k]
        best = float((ideal * discount[: len(ideal)]).sum())
        if best <= 0:
            continue
        top = g[np.lexsort((np.arange(size), -s))][:k]
        total += float((top * discount[: len(top)]).sum()) / best
        n += 1
    return total / n if n else float("nan")


def _count_recall(found: dict[str, int], cands: Candidates, positive: np.ndarray) -> None:
    found["all"] += int(positive.sum())
    for name in SOURCE_NAMES:
        found[name] += int((positive & cands.has(name)).sum())


def relevance_grades(labels: np.ndarray) -> np.ndarray:
    """Event weights -> integer lambdarank grades: 0 none, then 1 + log2(weight) (view 1 ... purchase 4)."""
    labels = np.asarray(labels, dtype=np.float64)
    grades = np.zeros(len(labels), dtype=np.int32)
    pos = labels > 0
    grades[pos] = np.clip(np.round(np.log2(np.maximum(labels[pos], 1.0))) + 1, 1, 30).astype(np.int32)
    return grades


@dataclass
class RankerTrainResult:
    ranker: Any  # recsvc.ranker.Ranker
    train: RankingDataset
    valid: RankingDataset
    metrics: dict[str, Any]
    novel_ranker: Any | None = None  # for repeat_policy=exclude; None when it did not beat `ranker`


def train_ranker(
    interactions: pl.DataFrame,
    *,
    t2: int,
    t1: int,
    t_end: int,
    catalog: Catalog,
    item_emb: np.ndarray,
    index: Any,
    tower: TowerParams,
    config: TrainConfig,
    progress: bool = False,
) -> RankerTrainResult:
    """Train on labels [T2, T1) with features from < T2 (and the `train_label_windows` - 1 windows
    before it); validate on labels [T1, T) from < T1.

    `interactions` must be the training data (< T); rows >= T are ignored.
    """
    from recsvc.ranker import Ranker

    data = interactions.filter(pl.col("timestamp") < t_end)
    common = dict(
        catalog=catalog,
        item_emb=item_emb,
        index=index,
        tower=tower,
        cand_cfg=config.candidates,
        seed=config.ranker.seed,
        progress=progress,
        cf_cfg=config.collaborative,
    )
    start = data["timestamp"].min()
    windows = training_windows(t2, t1, t2 if start is None else int(start), config.ranker.train_label_windows)
    novel = config.ranker.novel_ranker

    def sets_at(cutoff: int, end: int, max_users: int) -> tuple[RankingDataset, RankingDataset | None]:
        """The ranking set at `cutoff` and, for the novel ranker, its owned-items-excluded twin,
        both from one serving state (state_at fits ALS and counts co-occurrence: done once)."""
        state = state_at(data, catalog, cutoff, config.candidates, config.collaborative)
        kw = dict(cutoff=cutoff, label_end=end, max_users=max_users, state=state, **common)
        owned_excluded = build_ranking_dataset(data, data, exclude_owned=True, **kw) if novel else None
        return build_ranking_dataset(data, data, **kw), owned_excluded

    train_sets = [sets_at(c, e, config.ranker.max_train_users) for c, e in windows]
    train = concat_datasets([main for main, _ in train_sets])
    valid, novel_valid = sets_at(t1, t_end, _valid_users(config.ranker))
    if train.n_rows == 0:
        raise ValueError(
            f"no ranker training rows: no user with a candidate hit in labels [{t2}, {t1}); "
            "more data or a longer SplitConfig.valid_days is needed"
        )
    ranker = Ranker.train(
        train.features,
        relevance_grades(train.labels),
        train.groups,
        valid.features if valid.n_rows else None,
        relevance_grades(valid.labels) if valid.n_rows else None,
        valid.groups if valid.n_rows else None,
        config.ranker,
        feature_names=list(FEATURE_NAMES),
    )
    novel_ranker, novel_metrics = (
        _train_novel_ranker(
            concat_datasets([n for _, n in train_sets if n is not None]), novel_valid, ranker, config
        )
        if novel_valid is not None
        else (None, {})
    )
    metrics = {
        **novel_metrics,
        "train_windows": [list(w) for w in windows],
        "valid_ndcg": (
            grouped_ndcg(
                ranker.predict_stock(valid.features), valid.labels, valid.groups, config.ranker.eval_at
            )
            if valid.n_rows
            else float("nan")
        ),
        "train_users": len(train.user_ids),
        "train_rows": train.n_rows,
        "valid_users": len(valid.user_ids),
        "valid_rows": valid.n_rows,
        "train_candidate_recall": train.recall,
        "valid_candidate_recall": valid.recall,
    }
    return RankerTrainResult(ranker, train, valid, metrics, novel_ranker)


def _train_novel_ranker(
    train: RankingDataset, valid: RankingDataset, main: Any, config: TrainConfig
) -> tuple[Any | None, dict[str, Any]]:
    """A ranker for requests that exclude owned items (trained on the owned-items-excluded sets),
    kept only if it beats the main ranker on the validation window's owned-items-excluded set
    (the main ranker never saw that task)."""
    from recsvc.ranker import Ranker

    if train.n_rows == 0 or valid.n_rows == 0:
        log.info(
            "novel ranker skipped: no rows without owned items (train %d, valid %d)",
            train.n_rows,
            valid.n_rows,
        )
        return None, {}
    novel = Ranker.train(
        train.features,
        relevance_grades(train.labels),
        train.groups,
        valid.features,
        relevance_grades(valid.labels),
        valid.groups,
        config.ranker,
        feature_names=list(FEATURE_NAMES),
    )
    k = config.ranker.eval_at
    scores = {
        name: grouped_ndcg(model.predict_stock(valid.features), valid.labels, valid.groups, k)
        for name, model in (("main", main), ("novel", novel))
    }
    chosen = scores["novel"] > scores["main"]
    log.info(
        "novel-mode validation ndcg@%d: main ranker %.4f, novel ranker %.4f -> %s",
        k,
        scores["main"],
        scores["novel"],
        "novel ranker ships" if chosen else "main ranker serves novel requests",
    )
    metrics = {
        "novel_valid_ndcg": scores,
        "novel_ranker_used": chosen,
        "novel_train_rows": train.n_rows,
        "novel_valid_candidate_recall": valid.recall,
    }
    return (novel if chosen else None), metrics


def _valid_users(cfg: RankerConfig) -> int:
    return max(1, cfg.max_train_users // 3)
