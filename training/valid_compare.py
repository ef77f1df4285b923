"""The pipeline against the baselines on the ranker's validation window [T1, T), like for like.

Why: the issue's targets are judged on the test day, but changes must be chosen without looking
at it. The ranker's own validation NDCG only ranks candidates (a positive outside the candidate
set is simply absent), so it cannot be set beside a baseline that ranks the full catalogue. Here
the pipeline is served exactly as at T (the same `Recommender`, cold slots and all) from serving
state built at T1 (histories, item stats, co-occurrence, ALS factors from data < T1), the
baselines are fitted on data < T1, and `training.evaluate` scores everyone on [T1, T) over the
full catalogue, in `novel` and `all` modes, on the same users.

Leaks to keep in mind when reading the figures: the encoder and tower never saw data >= T2, but
the ranker early-stopped on a sample of this window's labels, and the baselines' parameters are
tuned on this very window (training/eval_cli.build_systems), so both sides are a little flattered.

CLI, on the work dir of a `recsvc-train --work-dir` run (stages up to `ranker` done):
    python -m training.valid_compare --work-dir WORK [--config X.yaml] [--max-users N]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsvc.bundle import LoadedBundle
from recsvc.catalog import Catalog
from recsvc.config import TrainConfig
from training.baselines import CandidateGenerator
from training.evaluate import MODES, EvaluationTable, evaluate_systems
from training.report import PIPELINE_SYSTEM, best_baseline
from training.train_ranker import state_at

log = logging.getLogger(__name__)

NEEDED_STAGES = ("load", "split", "state", "embed", "index", "finetune", "ranker")  # of the work dir


def validation_bundle(
    interactions: pl.DataFrame,
    *,
    t1: int,
    catalog: Catalog,
    item_emb: np.ndarray,
    index: Any,
    tower: Any,
    ranker: Any,
    novel_ranker: Any | None,
    config: TrainConfig,
    encoder_dir: Path,
) -> LoadedBundle:
    """What the bundle would have been at T1: the trained rankers over serving state from data < T1
    (rows at or after `t1` are ignored)."""
    return state_at(interactions, catalog, t1, config.candidates, config.collaborative).bundle(
        path=Path(encoder_dir).parent,
        version=f"validation@{t1}",
        config=config,
        catalog=catalog,
        item_emb=item_emb,
        index=index,
        tower=tower,
        ranker=ranker,
        encoder_dir=encoder_dir,
        novel_ranker=novel_ranker,
    )


def compare_on_validation(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    *,
    t1: int,
    t_end: int,
    bundle: LoadedBundle,
    baselines: Sequence[CandidateGenerator],
    ks: Sequence[int] = (12, 100, 200),
    modes: Sequence[str] = MODES,
    max_users: int | None = None,
    seed: int = 42,
) -> EvaluationTable:
    """Baselines fitted on data < `t1` and the pipeline served from `bundle` (see
    `validation_bundle`), scored on [`t1`, `t_end`) by the evaluation harness on the same users."""
    from recsvc.recommender import Recommender
    from training.pipeline import RecommenderSystem

    if bundle.data_end_ts != t1:
        raise ValueError(f"bundle state is at {bundle.data_end_ts}, not at the validation cutoff T1={t1}")
    ts = pl.col("timestamp")
    train = interactions.filter(ts < t1)
    valid = interactions.filter((ts >= t1) & (ts < t_end))
    if valid.height == 0:
        raise ValueError(f"no interaction in the validation window [{t1}, {t_end})")
    return evaluate_systems(
        [*baselines, RecommenderSystem(Recommender(bundle))],
        train,
        valid,
        items,
        ks=ks,
        modes=modes,
        max_users=max_users,
        seed=seed,
        protocol={"validation_window": [t1, t_end], "pipeline_state_at": t1},
    )


def ratio_lines(table: EvaluationTable, metric: str = "ndcg@12") -> list[str]:
    """Per mode: the pipeline's `metric` over the best baseline's, the issue's headline ratio (the
    baseline picked by `training.report.best_baseline`, as in the run's own report)."""
    lines = []
    for mode in table.modes:
        scores = {r["system"]: r["modes"][mode]["metrics"] for r in table.results if mode in r["modes"]}
        ours = scores.get(PIPELINE_SYSTEM, {}).get(metric)
        name, best = best_baseline(scores, metric)
        if ours is None or name is None or best is None:
            continue
        ratio = ours / best if best > 0 else float("nan")
        lines.append(
            f"{mode}: {PIPELINE_SYSTEM} {metric} {ours:.5f} vs best baseline {name} {best:.5f} (x{ratio:.3f})"
        )
    return lines


# ----------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.valid_compare",
        description="Score the pipeline (serving state at T1, rankers from the work dir's ranker "
        "stage) and the baselines (fitted on < T1, tuned as in the evaluate stage) on the ranker's "
        "validation window [T1, T): the like-for-like check to choose changes on, never the test day.",
    )
    p.add_argument(
        "--work-dir", required=True, type=Path, help="recsvc-train --work-dir with stages up to ranker"
    )
    p.add_argument("--config", default=None, help="the YAML/JSON TrainConfig overrides the run used")
    p.add_argument("--max-users", type=int, default=None, help="score a seeded sample of users (default all)")
    p.add_argument("--out", type=Path, default=None, help="write the full results as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from recsvc import bundle as bundle_mod
    from recsvc.ranker import Ranker
    from training.cli import ConfigFileError, config_from_file
    from training.eval_cli import build_systems
    from training.pipeline import (
        BASELINE_SYSTEMS,
        PipelineError,
        Windows,
        WorkDir,
        budgeted_config,
        plan_budget,
        read_json,
    )

    try:
        cfg = config_from_file(args.config) if args.config else TrainConfig()
        cfg = budgeted_config(cfg, plan_budget(cfg, "cpu"))
        work = WorkDir(args.work_dir)
        # every stage it reads, checked up front so a missing one is an exit-2 message, not a traceback
        dirs = {s: work.require(s, "valid_compare") for s in NEEDED_STAGES}
        windows = Windows.from_dict(read_json(dirs["split"] / "windows.json"))
    except (PipelineError, ConfigFileError, TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not windows.evaluate:
        print("error: the run has no test period, so no validation window to compare on", file=sys.stderr)
        return 2
    from recsvc.retrieval import ItemIndex
    from recsvc.user_tower import load_params

    interactions = pl.read_parquet(dirs["load"] / "interactions.parquet")
    items = pl.read_parquet(dirs["load"] / "items.parquet")
    before_t = interactions.filter(pl.col("timestamp") < windows.T)
    novel_dir = dirs["ranker"] / bundle_mod.NOVEL_RANKER_DIR
    bundle = validation_bundle(
        before_t,
        t1=windows.T1,
        catalog=Catalog.load(dirs["state"] / "catalog.parquet"),
        item_emb=np.load(dirs["embed"] / "item_embeddings.npy"),
        index=ItemIndex.load(dirs["index"]),
        tower=load_params(dirs["finetune"] / "user_tower.npz"),
        ranker=Ranker.load(dirs["ranker"] / "ranker"),
        novel_ranker=Ranker.load(novel_dir) if novel_dir.exists() else None,
        config=cfg,
        encoder_dir=dirs["finetune"] / "encoder",
    )
    baselines, _ = build_systems(
        [s for s in BASELINE_SYSTEMS if s in cfg.eval.systems],
        before_t,
        items,
        baseline_config=cfg.baselines,
        eval_config=cfg.eval,
        valid_days=cfg.split.valid_days,
        do_tune=cfg.eval.tune,
    )
    table = compare_on_validation(
        before_t,
        items,
        t1=windows.T1,
        t_end=windows.T,
        bundle=bundle,
        baselines=baselines,
        modes=cfg.eval.modes,
        max_users=args.max_users,
        seed=cfg.eval.seed,
    )
    if args.out is not None:
        table.to_json(args.out)
    print(table.to_console())
    print("\n".join(ratio_lines(table)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
