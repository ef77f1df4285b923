"""Offline evaluation protocol shared by every system (baselines, raw encoder, the full model).

Protocol
--------
* Time split: systems are fitted on `train` (timestamps < cutoff) only; `test` is what users did
  at or after the cutoff (see training/split.py). Hyper-parameters are tuned on a validation
  window cut from the end of `train` (training/baselines.tune), never on `test`.
* Evaluated users: every user with a test interaction, known to train or not; unknown users get
  whatever the system does for them (popularity for the baselines). `max_users` evaluates a
  seeded random sample instead.
* Ranking is over the full catalogue (`items`), top K = max(ks).
* Two modes:
  - ``all``: held-out = every distinct item the user interacted with in test; repurchases count,
    and systems are called with ``exclude_seen=False``.
  - ``novel``: held-out = test items the user never had in train; systems are called with
    ``exclude_seen=True``; users with no novel test item are skipped.
* Metrics per K (training/metrics.py): recall, precision, NDCG, MAP (AP normalised by
  min(|held-out|, K)), hit rate, catalogue coverage, cold-start recall (held-out items with no
  train interaction at all), and the share of list slots taken by items the user already had.
  Each mode also reports the same metrics over known users alone (users with train history),
  since new users can only get what the system does for strangers.
* Wall time: seconds spent in ``fit`` plus all ``recommend`` calls.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from training.baselines import CandidateGenerator
from training.metrics import (
    PAD,
    average_precision_at_k,
    catalogue_coverage,
    cold_start_recall,
    hit_rate_at_k,
    hits_from_indices,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    relevance_keys,
)

log = logging.getLogger(__name__)

MODES = ("all", "novel")
SEGMENTS = ("all_users", "known_users")


class EvaluationError(ValueError):
    """A system's output or the evaluation inputs break the protocol; the message says how."""


def _check_args(ks: Sequence[int], modes: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if not ks or any(int(k) <= 0 for k in ks):
        raise EvaluationError(f"ks must be positive integers, got {list(ks)}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise EvaluationError(f"unknown evaluation mode(s) {bad or '[]'}; choose from {', '.join(MODES)}")
    return tuple(sorted({int(k) for k in ks})), tuple(dict.fromkeys(modes))


def _pairs(frame: pl.DataFrame, catalogue: pl.DataFrame, what: str) -> pl.DataFrame:
    """Distinct (user_id, item_idx) pairs; items outside the catalogue are dropped with a warning."""
    for column in ("user_id", "item_id"):
        if column not in frame.columns:
            raise EvaluationError(f"{what} interactions lack column {column!r}")
    pairs = frame.select("user_id", "item_id").unique().join(catalogue, on="item_id", how="left")
    outside = pairs.filter(pl.col("item_idx").is_null()).height
    if outside:
        log.warning(
            "%s: %d (user, item) pair(s) reference items missing from the catalogue; ignored", what, outside
        )
    return pairs.filter(pl.col("item_idx").is_not_null()).select("user_id", "item_idx")


def recommendations_matrix(
    frame: pl.DataFrame, user_ids: Sequence[str], catalogue: pl.DataFrame, k: int, system: str
) -> np.ndarray:
    """Candidate frame -> int64[len(user_ids), k] catalogue indices in rank order, PAD-padded.

    Duplicate (user, item) rows keep the best rank; items outside the catalogue are an error.
    """
    missing = [c for c in ("user_id", "item_id", "rank") if c not in frame.columns]
    if missing:
        raise EvaluationError(f"system {system!r} returned a frame without column(s) {', '.join(missing)}")
    users = pl.DataFrame({"user_id": pl.Series(list(user_ids), dtype=pl.Utf8)}).with_row_index("row")
    ranked = (
        frame.select(pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8), pl.col("rank"))
        .join(users, on="user_id", how="inner")
        .join(catalogue, on="item_id", how="left")
    )
    outside = ranked.filter(pl.col("item_idx").is_null())
    if outside.height:
        examples = ", ".join(outside["item_id"].unique().head(3).to_list())
        raise EvaluationError(
            f"system {system!r} recommended {outside.height} item(s) not in the catalogue (e.g. {examples})"
        )
    ranked = (
        ranked.sort("row", "rank")
        .unique(subset=["row", "item_idx"], keep="first", maintain_order=True)
        .with_columns(pl.int_range(pl.len()).over("row").alias("position"))
        .filter(pl.col("position") < k)
    )
    recs = np.full((len(user_ids), k), PAD, dtype=np.int64)
    recs[ranked["row"].to_numpy(), ranked["position"].to_numpy()] = ranked["item_idx"].to_numpy()
    return recs


def _public_params(system: CandidateGenerator) -> dict[str, Any]:
    """Hyper-parameters worth recording: the system's public scalar attributes."""
    return {
        key: value
        for key, value in vars(system).items()
        if not key.startswith("_") and isinstance(value, (int, float, str, bool)) and key != "name"
    }


def _mode_metrics(
    recs: np.ndarray,
    rows: np.ndarray,
    items: np.ndarray,
    seen_keys: np.ndarray,
    cold: np.ndarray,
    ks: tuple[int, ...],
    n_items: int,
) -> dict[str, float]:
    """Every metric at every K, averaged over the rows of `recs` (each row has a held-out item)."""
    keys = relevance_keys(rows, items, n_items)
    hits = hits_from_indices(recs, keys, n_items)
    n_relevant = np.bincount(keys // n_items, minlength=recs.shape[0])
    repeat = hits_from_indices(recs, seen_keys, n_items)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(recall_at_k(hits, n_relevant, k).mean())
        out[f"precision@{k}"] = float(precision_at_k(hits, k).mean())
        out[f"ndcg@{k}"] = float(ndcg_at_k(hits, n_relevant, k).mean())
        out[f"map@{k}"] = float(average_precision_at_k(hits, n_relevant, k).mean())
        out[f"hit_rate@{k}"] = float(hit_rate_at_k(hits, k).mean())
        out[f"coverage@{k}"] = catalogue_coverage(recs, k, n_items)
        cold_value, cold_users = cold_start_recall(recs, rows, items, cold, n_items, k)
        out[f"cold_recall@{k}"] = cold_value
        out["cold_users"] = float(cold_users)
        out[f"repeat_share@{k}"] = float(repeat[:, :k].sum() / (recs[:, :k] != PAD).sum().clip(min=1))
    return out


def evaluate_system(
    system: CandidateGenerator,
    train: pl.DataFrame,
    test: pl.DataFrame,
    items: pl.DataFrame,
    ks: Sequence[int] = (12, 50, 100, 200),
    modes: Sequence[str] = MODES,
    *,
    max_users: int | None = None,
    seed: int = 42,
    fit: bool = True,
) -> dict[str, Any]:
    """Fit `system` on `train` and score its top-max(ks) lists against `test` (protocol above).

    Returns {"system", "params", "fit_s", "recommend_s", "wall_s", "users", "modes": {mode:
    {"users", "known_users", "new_users", "recommend_s", "metrics": {"recall@12": ..., ...},
    "known_user_metrics": {...}}}}` (the last absent when no evaluated user has train history).
    `fit=False` evaluates an already fitted system (fit_s is then 0).
    """
    ks, modes = _check_args(ks, modes)
    top_k = max(ks)
    catalogue = items.select(pl.col("item_id").cast(pl.Utf8)).with_row_index("item_idx")
    n_items = catalogue.height
    if n_items == 0:
        raise EvaluationError("the item catalogue is empty")
    test_pairs = _pairs(test, catalogue, "test")
    train_pairs = _pairs(train, catalogue, "train")
    users = sorted(test_pairs["user_id"].unique().to_list())
    if max_users is not None and len(users) > max_users:
        picked = np.random.default_rng(seed).choice(len(users), size=max_users, replace=False)
        users = [users[i] for i in sorted(picked)]
    if not users:
        raise EvaluationError("no test interaction matches the catalogue: nothing to evaluate")
    known_users = set(train["user_id"].unique().to_list())
    cold = np.ones(n_items, dtype=bool)
    cold[train_pairs["item_idx"].to_numpy()] = False

    fit_s = 0.0
    if fit:
        started = time.perf_counter()
        system.fit(train, items)
        fit_s = time.perf_counter() - started

    result: dict[str, Any] = {
        "system": system.name,
        "params": _public_params(system),
        "fit_s": fit_s,
        "users": len(users),
        "modes": {},
    }
    user_frame = pl.DataFrame({"user_id": pl.Series(users, dtype=pl.Utf8)})
    recommend_total = 0.0
    for mode in modes:
        held_out = test_pairs.join(user_frame, on="user_id", how="semi")
        if mode == "novel":
            held_out = held_out.join(train_pairs, on=["user_id", "item_idx"], how="anti")
        mode_users = sorted(held_out["user_id"].unique().to_list())
        if not mode_users:
            log.warning("%s: no user has held-out items in mode %r; skipped", system.name, mode)
            continue
        started = time.perf_counter()
        frame = system.recommend(mode_users, top_k, exclude_seen=(mode == "novel"))
        recommend_s = time.perf_counter() - started
        recommend_total += recommend_s
        recs = recommendations_matrix(frame, mode_users, catalogue, top_k, system.name)

        rows_frame = pl.DataFrame({"user_id": pl.Series(mode_users, dtype=pl.Utf8)}).with_row_index("row")
        relevant = held_out.join(rows_frame, on="user_id")
        seen = train_pairs.join(rows_frame, on="user_id")
        rel_rows, rel_items = relevant["row"].to_numpy(), relevant["item_idx"].to_numpy()
        seen_rows, seen_items = seen["row"].to_numpy(), seen["item_idx"].to_numpy()
        seen_keys = relevance_keys(seen_rows, seen_items, n_items)
        metrics = _mode_metrics(recs, rel_rows, rel_items, seen_keys, cold, ks, n_items)
        known = np.fromiter((u in known_users for u in mode_users), dtype=bool, count=len(mode_users))
        entry: dict[str, Any] = {
            "users": len(mode_users),
            "known_users": int(known.sum()),
            "new_users": int((~known).sum()),
            "recommend_s": recommend_s,
            "metrics": metrics,
        }
        if known.any():
            # Users with train history: where personalisation can show (new users get popularity).
            new_row = np.cumsum(known) - 1
            keep_rel, keep_seen = known[rel_rows], known[seen_rows]
            entry["known_user_metrics"] = _mode_metrics(
                recs[known],
                new_row[rel_rows[keep_rel]],
                rel_items[keep_rel],
                relevance_keys(new_row[seen_rows[keep_seen]], seen_items[keep_seen], n_items),
                cold,
                ks,
                n_items,
            )
        result["modes"][mode] = entry
        log.info(
            "%s [%s] users=%d map@%d=%.4f recall@%d=%.4f (recommend %.1fs)",
            system.name,
            mode,
            len(mode_users),
            ks[0],
            metrics[f"map@{ks[0]}"],
            top_k,
            metrics[f"recall@{top_k}"],
            recommend_s,
        )
    result["recommend_s"] = recommend_total
    result["wall_s"] = fit_s + recommend_total
    return result


@dataclass
class EvaluationTable:
    """Results of several systems under one protocol; JSON for machines, tables for people."""

    results: list[dict[str, Any]]
    ks: tuple[int, ...]
    modes: tuple[str, ...]
    protocol: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> list[str]:
        """Headline metrics: MAP/recall/NDCG/hit rate/coverage at the smallest K, recall at the others."""
        first, last = self.ks[0], self.ks[-1]
        cols = [f"map@{first}", f"recall@{first}", f"ndcg@{first}", f"hit_rate@{first}"]
        cols += [f"recall@{k}" for k in self.ks[1:]]
        cols += [f"coverage@{first}", f"cold_recall@{last}", f"repeat_share@{first}"]
        return cols

    def rows(self, segment: str = "all_users") -> list[list[str]]:
        """One row per (system, mode): names, users, headline metrics, wall seconds.

        `segment`: "all_users" (every evaluated user) or "known_users" (users with train history).
        """
        if segment not in SEGMENTS:
            raise ValueError(f"unknown segment {segment!r}; choose from {', '.join(SEGMENTS)}")
        out = []
        for result in self.results:
            for mode in self.modes:
                entry = result["modes"].get(mode)
                if entry is None:
                    continue
                metrics = entry["metrics"] if segment == "all_users" else entry.get("known_user_metrics")
                if metrics is None:
                    continue
                users = entry["users"] if segment == "all_users" else entry["known_users"]
                values = [_fmt(metrics.get(c, float("nan"))) for c in self.columns()]
                out.append([result["system"], mode, str(users), *values, f"{result['wall_s']:.2f}"])
        return out

    def header(self) -> list[str]:
        return ["system", "mode", "users", *self.columns(), "wall_s"]

    def to_markdown(self, segment: str = "all_users") -> str:
        header = self.header()
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows(segment)]
        return "\n".join(lines)

    def to_console(self, segment: str = "all_users") -> str:
        header, rows = self.header(), self.rows(segment)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([fmt.format(*header), rule, *(fmt.format(*r) for r in rows)])

    def __str__(self) -> str:
        return self.to_console()

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": {**self.protocol, "ks": list(self.ks), "modes": list(self.modes)},
            "results": self.results,
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the full results (every metric, params, timings) as JSON; NaN becomes null."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_nan_to_none(self.to_dict()), indent=2, sort_keys=False) + "\n")
        return path


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def evaluate_systems(
    systems: Sequence[CandidateGenerator],
    train: pl.DataFrame,
    test: pl.DataFrame,
    items: pl.DataFrame,
    ks: Sequence[int] = (12, 50, 100, 200),
    modes: Sequence[str] = MODES,
    *,
    max_users: int | None = None,
    seed: int = 42,
    protocol: dict[str, Any] | None = None,
) -> EvaluationTable:
    """`evaluate_system` for each system on the same split and users; `protocol` notes go to the JSON."""
    ks, modes = _check_args(ks, modes)
    results = []
    for system in systems:
        log.info("evaluating %s", system.name)
        results.append(evaluate_system(system, train, test, items, ks, modes, max_users=max_users, seed=seed))
    notes = {
        "train_rows": train.height,
        "test_rows": test.height,
        "catalogue_items": items.height,
        "max_users": max_users,
        "seed": seed,
        **(protocol or {}),
    }
    return EvaluationTable(results=results, ks=ks, modes=modes, protocol=notes)
