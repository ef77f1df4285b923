"""Baselines on the real H&M week: last day held out, baselines tuned on the day before it.

Prints the comparison table and wall times, writes bench-out/baselines.json (+ .md). Includes the
raw (not fine-tuned) BERT retrieval baseline when training/text_baseline.py is importable.
Exits 0 with a message when the shared data folder is absent.

    .venv/bin/python benchmarks/bench_baselines.py [--data DIR] [--systems ...] [--no-tune]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recsvc.config import EvalConfig  # noqa: E402
from training.eval_cli import parse_systems, report_markdown, report_text, run_evaluation  # noqa: E402

DEFAULT_DATA = REPO / ".." / "shared" / "data" / "hm_fashion_lastweek"
DEFAULT_OUT = REPO / "bench-out" / "baselines.json"

log = logging.getLogger("bench_baselines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="canonical data folder (default: %(default)s)"
    )
    parser.add_argument(
        "--systems",
        default="popularity,repeat_pop,itemknn,als,raw_encoder",
        help="comma-separated systems (see recsvc-eval --help); raw_encoder is skipped with a warning "
        "when unavailable. Default: %(default)s",
    )
    parser.add_argument(
        "--test-days", type=float, default=1.0, help="held-out days at the end (default: %(default)s)"
    )
    parser.add_argument(
        "--valid-days", type=float, default=1.0, help="tuning window inside train (default: %(default)s)"
    )
    parser.add_argument(
        "--k", type=int, nargs="+", default=[12, 50, 100, 200], help="cut-offs (default: %(default)s)"
    )
    parser.add_argument("--max-users", type=int, default=None, help="sample of test users (default: all)")
    parser.add_argument(
        "--encoder-dir", default=None, help="encoder for raw_encoder (default: the shipped all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--no-tune", action="store_true", help="use BaselineConfig defaults instead of tuning"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON output; Markdown goes next to it (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = args.data.resolve()
    if not data.is_dir():
        print(f"bench_baselines: data folder {data} not found; nothing to benchmark (pass --data DIR).")
        return 0
    config = EvalConfig(
        ks=tuple(sorted(set(args.k))),
        systems=tuple(parse_systems(args.systems)),
        max_users=args.max_users,
        tune=not args.no_tune,
    )
    started = time.perf_counter()
    table = run_evaluation(
        data,
        systems=config.systems,
        test_days=args.test_days,
        valid_days=args.valid_days,
        eval_config=config,
        checkpoint=args.out,
        encoder_dir=args.encoder_dir,
    )
    total = time.perf_counter() - started
    print()
    print(report_text(table))
    print("\nwall time per system (s): tune / fit / recommend (all modes)")
    for result in table.results:
        tune_s = result.get("tuning", {}).get("seconds", 0.0)
        print(f"  {result['system']:12s} {tune_s:7.1f} {result['fit_s']:7.1f} {result['recommend_s']:7.1f}")
    print(f"total {total:.1f} s (shared machine: timings are noisy)")
    path = table.to_json(args.out)
    path.with_suffix(".md").write_text(report_markdown(table))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
