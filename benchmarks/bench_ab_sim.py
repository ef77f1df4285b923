"""Replayed A/B and interleaving tests on the H&M week: can the experiment machinery see quality?

Held-out last day = simulated future (training/simulate_ab.py). Users active that day are served
once at the cutoff by two variants; a shown item they really bought is clicked (and bought)
with some probability, other shown items rarely. Runs, each through the real exposure log,
attribution and `recsvc-ab` statistics:

- baselines: popularity vs repeat-then-popular (no bundle needed);
- with the trained bundle (`Recommender`, `RankingPolicy` variants): popularity vs full model
  (ranker), ANN-only vs ranker, and an A/A (ranker vs ranker);
- interleaving: popularity vs ranker and ANN-only vs ranker.

Checks: where the offline metrics say one variant is better the test must be significant in
that direction; the A/A must not be. The bundle must have been trained with the same held-out
day (bench_pipeline.py does this: bench-out/pipeline/bundles). Exits 0 with a message when the
data is absent; runs only the baseline part when no bundle exists.

    .venv/bin/python benchmarks/bench_ab_sim.py [--data DIR] [--bundle DIR] [--max-users N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recsvc import bundle as bundle_mod  # noqa: E402
from recsvc.ab_report import ABReport, format_text  # noqa: E402
from training.baselines import PopularityBaseline, RepeatThenPopular  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.simulate_ab import (  # noqa: E402
    SimulationConfig,
    VariantFn,
    baseline_variant,
    recommender_variant,
    run_simulation,
)
from training.split import holdout_cutoff, time_split  # noqa: E402

DEFAULT_DATA = REPO / ".." / "shared" / "data" / "hm_fashion_lastweek"
DEFAULT_BUNDLE = REPO / "bench-out" / "pipeline" / "bundles"
ALPHA = 0.05
log = logging.getLogger("bench_ab_sim")


def memoised(fn: VariantFn) -> VariantFn:
    """Serve each user once per variant: the replay asks the same (user, k, now) in several runs."""
    cache: dict[tuple[str, int], list[str]] = {}

    def ranked(user_ids: Sequence[str], k: int) -> dict[str, list[str]]:
        todo = [u for u in user_ids if (u, k) not in cache]
        if todo:
            for u, items in fn(todo, k).items():
                cache[(u, k)] = items
        return {u: cache.get((u, k), []) for u in user_ids}

    return ranked


def summarise(name: str, report: ABReport, treatment: str, expect: str) -> dict[str, Any]:
    """One run's headline: CTR/conversion deltas (A/B) or Δ_AB (interleaving) and the check."""
    (exp,) = report.experiments
    row: dict[str, Any] = {"run": name, "expect": expect}
    if exp.interleaving:
        (il,) = exp.interleaving
        sign = 1 if il.team_a == treatment else -1  # preference for the treatment
        row.update(
            kind="interleaving",
            impressions=il.impressions,
            wins_treatment=il.test.wins_a if sign > 0 else il.test.wins_b,
            wins_control=il.test.wins_b if sign > 0 else il.test.wins_a,
            preference_for_treatment=round(sign * il.test.preference, 4),
            p_value=il.test.p_value,
        )
        effect, p = sign * il.test.preference, il.test.p_value
    else:
        t = next(v for v in exp.variants if v.variant == treatment)
        c = next(v for v in exp.variants if v.variant == exp.control)
        row.update(
            kind="ab",
            exposures={c.variant: c.exposures, t.variant: t.exposures},
            ctr={c.variant: round(c.ctr.rate, 5), t.variant: round(t.ctr.rate, 5)},
            ctr_diff=round(t.ctr_test.diff, 5),
            ctr_p=t.ctr_test.p_value,
            conversion_diff=round(t.conversion_test.diff, 5),
            conversion_p=t.conversion_test.p_value,
        )
        effect, p = t.ctr_test.diff, t.ctr_test.p_value
    if expect == "better":
        row["ok"] = bool(effect > 0 and p < ALPHA)
    elif expect == "same":
        row["ok"] = bool(p >= ALPHA)
    else:
        row["ok"] = None  # reported, no expectation
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="canonical data folder (default: H&M week)"
    )
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="trained bundle or bundles root")
    p.add_argument(
        "--out", type=Path, default=REPO / "bench-out" / "ab_sim", help="logs, reports, summary JSON"
    )
    p.add_argument(
        "--test-days", type=float, default=1.0, help="held-out days (must match the bundle's training)"
    )
    p.add_argument("--k", type=int, default=12, help="items shown per request (default: %(default)s)")
    p.add_argument(
        "--max-users", type=int, default=None, help="cap on simulated users (default: all held-out users)"
    )
    p.add_argument("--seed", type=int, default=0, help="assignment salt and behaviour seed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.data.is_dir():
        print(f"bench_ab_sim: data folder {args.data} not found; nothing to benchmark (pass --data DIR).")
        return 0

    started = time.perf_counter()
    data = load_dataset(args.data)
    cutoff = holdout_cutoff(data.interactions, args.test_days)
    split = time_split(data.interactions, cutoff)
    cfg = SimulationConfig(k=args.k, max_users=args.max_users, seed=args.seed)
    il_cfg = SimulationConfig(k=args.k, max_users=args.max_users, seed=args.seed, interleave=True)

    popularity, repeat = PopularityBaseline(), RepeatThenPopular()
    popularity.fit(split.train, data.items)
    repeat.fit(split.train, data.items)
    variants: dict[str, VariantFn] = {
        "popularity": baseline_variant(popularity),
        "repeat_pop": baseline_variant(repeat),
    }

    runs: list[tuple[str, str, str, str, SimulationConfig, str]] = [
        ("baselines_ab", "popularity", "repeat_pop", "better", cfg, "simulation"),
    ]
    model_version = "baselines"
    try:
        loaded = bundle_mod.load(args.bundle)
    except bundle_mod.BundleError as exc:
        print(
            f"bench_ab_sim: no trained bundle ({exc}); running the baseline replay only. "
            "Run benchmarks/bench_pipeline.py first for the model variants."
        )
        loaded = None
    if loaded is not None:
        if loaded.data_end_ts > cutoff:
            print(
                f"bench_ab_sim: error: bundle {loaded.version} holds data up to {loaded.data_end_ts}, after the "
                f"held-out cutoff {cutoff}: it was not trained with --test-days {args.test_days:g} held out",
                file=sys.stderr,
            )
            return 2
        from recsvc.recommender import RankingPolicy, Recommender

        recommender = Recommender(loaded)
        recommender.warm()
        model_version = loaded.version
        variants["ranker"] = memoised(
            recommender_variant(recommender, RankingPolicy(use_ranker=True), now=cutoff)
        )
        variants["ann"] = memoised(
            recommender_variant(recommender, RankingPolicy(use_ranker=False), now=cutoff)
        )
        variants["ranker_copy"] = variants["ranker"]
        runs += [
            ("popularity_vs_ranker_ab", "popularity", "ranker", "better", cfg, model_version),
            ("ann_vs_ranker_ab", "ann", "ranker", "report", cfg, model_version),
            ("aa_ranker", "ranker", "ranker_copy", "same", cfg, model_version),
            ("popularity_vs_ranker_interleaving", "popularity", "ranker", "better", il_cfg, model_version),
            ("ann_vs_ranker_interleaving", "ann", "ranker", "report", il_cfg, model_version),
        ]
    else:
        runs.append(("aa_popularity", "popularity", "popularity_copy", "same", cfg, model_version))
        variants["popularity_copy"] = variants["popularity"]

    rows = []
    for name, control, treatment, expect, run_cfg, version in runs:
        t = time.perf_counter()
        result = run_simulation(
            split.test,
            {control: variants[control], treatment: variants[treatment]},
            args.out / name,
            ts=cutoff,
            items=data.items,
            cfg=run_cfg,
            control=control,
            model_version=version,
        )
        print(
            f"\n=== {name}: {control} vs {treatment} ({result.users} users, {time.perf_counter() - t:.1f}s) ==="
        )
        print(format_text(result.report))
        row = summarise(name, result.report, treatment, expect)
        row.update(
            control=control,
            treatment=treatment,
            users=result.users,
            seconds=round(time.perf_counter() - t, 1),
        )
        rows.append(row)

    print("\n=== summary ===")
    for r in rows:
        effect = (
            f"Δ_AB(treatment)={r['preference_for_treatment']:+.4f} p={r['p_value']:.3g}"
            if r["kind"] == "interleaving"
            else f"ΔCTR={r['ctr_diff']:+.4f} p={r['ctr_p']:.3g}  Δconv={r['conversion_diff']:+.4f} p={r['conversion_p']:.3g}"
        )
        status = {True: "ok", False: "FAILED", None: "-"}[r["ok"]]
        print(
            f"{r['run']:36s} {r['control']:>10s} vs {r['treatment']:<12s} {effect:60s} expect={r['expect']:7s} {status}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "cutoff": cutoff,
        "model_version": model_version,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "summary.json").write_text(json.dumps({**summary, "runs": rows}, indent=2))
    print(f"wrote {args.out / 'summary.json'}")
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
