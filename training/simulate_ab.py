"""Replay held-out interactions as a simulated A/B test (or interleaving test) of two variants.

Why: before exposing real users to a new model, check that the experiment machinery — hash
assignment, exposure log, event attribution, statistics — can tell a better variant from a worse
one, and that an A/A test stays quiet. Each user with held-out activity makes one request at the
test cutoff; the assigned variant shows `k` items; the user clicks shown items that are in their
real future (with probability `p_click`), buys some of those (value = item price, else 1), and
clicks a few irrelevant items at random (`click_noise`). Exposures go to a real `ExposureLog`,
events to parquet, and `recsvc.ab_report` judges the result.

A variant is any `VariantFn(user_ids, k) -> {user_id: ranked item ids}`: a training baseline
(`baseline_variant`) or the served model through `Recommender.recommend_many`
(`recommender_variant`) with a `RankingPolicy` per variant.

    python -m training.simulate_ab --data DIR --out DIR --control popularity --treatment itemknn
    python -m training.simulate_ab --data DIR --bundle BUNDLES --control ann --treatment ranker
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from tqdm import tqdm

from recsvc.ab_report import ABReport, format_text, run_report
from recsvc.config import DAY, ExperimentsConfig
from recsvc.experiments import ExperimentRouter, parse_experiments
from recsvc.exposures import Exposure, ExposureLog, pseudonymise, shown_items
from recsvc.interleaving import team_draft

if TYPE_CHECKING:
    from recsvc.recommender import RankingPolicy, Recommender
    from training.baselines import CandidateGenerator

log = logging.getLogger(__name__)

VariantFn = Callable[[Sequence[str], int], dict[str, list[str]]]
EXPERIMENT = "replay"
PSEUDONYM_KEY = "simulation"
EVENT_SCHEMA = {
    "user_id": pl.Utf8,
    "item_id": pl.Utf8,
    "event": pl.Utf8,
    "timestamp": pl.Int64,
    "value": pl.Float64,
    "request_id": pl.Utf8,
}


@dataclass(frozen=True)
class SimulationConfig:
    k: int = 12
    p_click: float = 0.7  # a shown item the user really interacts with later is clicked with this chance
    p_buy: float = 0.5  # ... and then bought with this chance
    click_noise: float = 0.01  # any other shown item is clicked with this chance
    p_request_id: float = 0.8  # events carrying the request id; the rest are matched by user + time
    interleave: bool = False  # team-draft both variants into one list instead of splitting users
    max_users: int | None = None
    batch_users: int = 512
    seed: int = 0


@dataclass(frozen=True)
class SimulationResult:
    exposures_path: Path
    events_path: Path
    users: int
    report: ABReport


def future_items(test: pl.DataFrame) -> dict[str, set[str]]:
    """What each user actually interacted with in the held-out period (the simulated ground truth)."""
    grouped = test.group_by("user_id").agg(pl.col("item_id").unique())
    return {u: set(items) for u, items in grouped.iter_rows()}


def baseline_variant(generator: CandidateGenerator, exclude_seen: bool = False) -> VariantFn:
    """A fitted `training.baselines` generator as a variant."""

    def ranked(user_ids: Sequence[str], k: int) -> dict[str, list[str]]:
        frame = generator.recommend(list(user_ids), k, exclude_seen).sort(["user_id", "rank"])
        grouped = frame.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
        return {u: list(items) for u, items in grouped.iter_rows()}

    return ranked


def recommender_variant(
    recommender: Recommender, policy: RankingPolicy, now: int | None = None, repeat_policy: str = "allow"
) -> VariantFn:
    """The served model (batched request path) under one ranking policy as a variant."""
    from recsvc.recommender import RecommendRequest

    def ranked(user_ids: Sequence[str], k: int) -> dict[str, list[str]]:
        reqs = [RecommendRequest(user_id=u, k=k, now=now, repeat_policy=repeat_policy) for u in user_ids]
        results = recommender.recommend_many(reqs, policy)
        return {u: [it.item_id for it in r.items] for u, r in zip(user_ids, results)}

    return ranked


def _router(names: tuple[str, str], salt: str) -> ExperimentRouter:
    return ExperimentRouter(
        parse_experiments(
            {
                "salt": f"{salt}-layer",
                "experiments": [
                    {
                        "name": EXPERIMENT,
                        "salt": salt,
                        "variants": [{"name": n, "share": 0.5} for n in names],
                    }
                ],
            },
            "simulation",
        )
    )


def _user_events(
    user: str,
    rid: str,
    shown: list[str],
    future: set[str],
    ts: int,
    prices: dict[str, float],
    cfg: SimulationConfig,
    rng: np.random.Generator,
) -> list[tuple]:
    rows = []
    for item in shown:
        relevant = item in future
        if rng.random() >= (cfg.p_click if relevant else cfg.click_noise):
            continue
        when = ts + int(rng.integers(1, 3_600))
        tag = rid if rng.random() < cfg.p_request_id else None
        rows.append((user, item, "click", when, None, tag))
        if relevant and rng.random() < cfg.p_buy:
            rows.append((user, item, "purchase", when + 60, prices.get(item, 1.0), tag))
    return rows


def simulate(
    users: Sequence[str],
    future: dict[str, set[str]],
    variants: dict[str, VariantFn],
    exposure_log: ExposureLog,
    *,
    ts: int,
    prices: dict[str, float] | None = None,
    cfg: SimulationConfig = SimulationConfig(),
    model_version: str = "simulation",
) -> pl.DataFrame:
    """Serve every user once, log exposures, and return the simulated events (EVENT_SCHEMA)."""
    if len(variants) != 2:
        raise ValueError(f"simulate needs exactly two variants, got {len(variants)}: {', '.join(variants)}")
    names = tuple(variants)
    if names[0] == names[1]:
        raise ValueError("the two variants need different names")
    router = _router((names[0], names[1]), f"replay-{cfg.seed}")
    rng = np.random.default_rng(cfg.seed)
    draft_rng = random.Random(cfg.seed)
    prices = prices or {}
    events: list[tuple] = []
    order = list(users)
    with tqdm(total=len(order), desc="simulated users", unit="user") as bar:
        for start in range(0, len(order), cfg.batch_users):
            batch = order[start : start + cfg.batch_users]
            if cfg.interleave:
                lists = {n: variants[n](batch, cfg.k) for n in names}
                served = {
                    u: (
                        router.assign(u).variant,
                        team_draft(
                            lists[names[0]].get(u, []),
                            lists[names[1]].get(u, []),
                            cfg.k,
                            draft_rng,
                            origins=names,
                        ),
                    )
                    for u in batch
                }
            else:
                groups: dict[str, list[str]] = {n: [] for n in names}
                for u in batch:
                    groups[router.assign(u).variant].append(u)
                served = {}
                for name, members in groups.items():
                    if members:
                        ranked = variants[name](members, cfg.k)
                        for u in members:
                            items = ranked.get(u, [])[: cfg.k]
                            served[u] = (name, [(i, name) for i in items])
            exposures = []
            for u in batch:
                variant, items = served[u]
                rid = f"sim{cfg.seed}-{start + len(exposures):08d}"
                exposures.append(
                    Exposure(
                        rid,
                        pseudonymise(u, PSEUDONYM_KEY),
                        EXPERIMENT,
                        variant,
                        shown_items([i for i, _ in items], [o for _, o in items]),
                        model_version,
                        ts,
                    )
                )
                events += _user_events(
                    u, rid, [i for i, _ in items], future.get(u, set()), ts, prices, cfg, rng
                )
            exposure_log.append_many(exposures)
            bar.update(len(batch))
    return pl.DataFrame(events, schema=EVENT_SCHEMA, orient="row")


def run_simulation(
    test: pl.DataFrame,
    variants: dict[str, VariantFn],
    out_dir: str | Path,
    *,
    ts: int,
    items: pl.DataFrame | None = None,
    cfg: SimulationConfig = SimulationConfig(),
    control: str | None = None,
    model_version: str = "simulation",
) -> SimulationResult:
    """Simulate on the users of `test` (held-out interactions), write logs, and report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    future = future_items(test)
    users = sorted(future)
    if cfg.max_users is not None and len(users) > cfg.max_users:
        users = sorted(random.Random(cfg.seed).sample(users, cfg.max_users))
    if not users:
        raise ValueError("the held-out period has no users to simulate")
    prices: dict[str, float] = {}
    if items is not None and "price" in items.columns:
        prices = {
            i: float(p)
            for i, p in items.select("item_id", "price").iter_rows()
            if p is not None and np.isfinite(p)
        }
    exposures_path = out / "exposures.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{exposures_path}{suffix}").unlink(missing_ok=True)
    with ExposureLog(exposures_path) as exposure_log:
        events = simulate(
            users, future, variants, exposure_log, ts=ts, prices=prices, cfg=cfg, model_version=model_version
        )
    events_path = out / "events.parquet"
    events.write_parquet(events_path)
    log.info("simulated %d users: %d events", len(users), events.height)
    report = run_report(
        exposures_path,
        events_path,
        out=out / "report.md",
        plot=out / "report.png",
        config=ExperimentsConfig(attribution_window_s=DAY),
        control=control or next(iter(variants)),
        pseudonym_key=PSEUDONYM_KEY,
    )
    return SimulationResult(exposures_path, events_path, len(users), report)


# ---------------------------------------------------------------------------------------------
# CLI


BASELINES = ("popularity", "repeat_pop", "itemknn")
MODEL_VARIANTS = ("ranker", "ann")


def _baseline(name: str) -> CandidateGenerator:
    from training import baselines

    return {
        "popularity": baselines.PopularityBaseline,
        "repeat_pop": baselines.RepeatThenPopular,
        "itemknn": baselines.ItemKNN,
    }[name]()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.simulate_ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="canonical data folder (interactions + items)")
    p.add_argument("--out", required=True, help="folder for exposures.sqlite, events.parquet, report.md/png")
    p.add_argument(
        "--bundle",
        help="bundle folder or bundles root (CURRENT) trained with the same test cutoff; needed for the "
        f"model variants {', '.join(MODEL_VARIANTS)}",
    )
    choices = (*BASELINES, *MODEL_VARIANTS)
    p.add_argument(
        "--control", default="popularity", choices=choices, help="control variant (default: %(default)s)"
    )
    p.add_argument(
        "--treatment", default="ranker", choices=choices, help="treatment variant (default: %(default)s)"
    )
    p.add_argument(
        "--test-days", type=float, default=1.0, help="held-out days at the end of the data (default: 1)"
    )
    p.add_argument("--k", type=int, default=12, help="items shown per request (default: %(default)s)")
    p.add_argument("--max-users", type=int, help="simulate at most this many held-out users (random sample)")
    p.add_argument(
        "--interleave", action="store_true", help="team-draft the two variants instead of splitting users"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for assignment salt and user behaviour")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.data import DataValidationError, load_dataset
    from training.split import holdout_cutoff, time_split

    if args.control == args.treatment:
        print(
            "simulate_ab: error: --control and --treatment must differ (an A/A test uses two baselines)",
            file=sys.stderr,
        )
        return 2
    if {args.control, args.treatment} & set(MODEL_VARIANTS) and not args.bundle:
        print("simulate_ab: error: the ranker/ann variants need --bundle", file=sys.stderr)
        return 2
    try:
        data = load_dataset(args.data)
    except DataValidationError as exc:
        print(f"simulate_ab: error: {exc}", file=sys.stderr)
        return 2
    cutoff = holdout_cutoff(data.interactions, args.test_days)
    split = time_split(data.interactions, cutoff)
    variants: dict[str, VariantFn] = {}
    recommender = None
    for name in (args.control, args.treatment):
        if name in BASELINES:
            gen = _baseline(name)
            gen.fit(split.train, data.items)
            variants[name] = baseline_variant(gen)
        else:
            if recommender is None:
                from recsvc import bundle as bundle_mod
                from recsvc.recommender import Recommender

                try:
                    loaded = bundle_mod.load(args.bundle)
                except bundle_mod.BundleError as exc:
                    print(f"simulate_ab: error: {exc}", file=sys.stderr)
                    return 2
                recommender = Recommender(loaded)
            from recsvc.recommender import RankingPolicy

            variants[name] = recommender_variant(
                recommender, RankingPolicy(use_ranker=name == "ranker"), now=cutoff
            )
    cfg = SimulationConfig(k=args.k, max_users=args.max_users, interleave=args.interleave, seed=args.seed)
    result = run_simulation(
        split.test, variants, args.out, ts=cutoff, items=data.items, cfg=cfg, control=args.control
    )
    print(format_text(result.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
