"""The whole `recsvc-train` pipeline on the real H&M week, last day held out.

Runs every stage with the default TrainConfig (plus the pipeline's own CPU/GPU budget logic),
then prints each stage's wall time and peak memory, the metrics table of every system from the
same run, and the headline ratios: final NDCG@12 vs the best baseline (all and novel modes),
fine-tuned vs raw encoder Recall@100, cold-start item recall. Writes the bundle under
bench-out/pipeline/bundles and a summary JSON to bench-out/pipeline.json. Exits 0 with a message
when the shared data folder is absent.

    .venv/bin/python benchmarks/bench_pipeline.py [--data DIR] [--out DIR] [--config FILE] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from recsvc.config import TrainConfig  # noqa: E402
from training import report  # noqa: E402
from training.cli import ConfigFileError, config_from_file  # noqa: E402
from training.data import DataValidationError  # noqa: E402
from training.pipeline import PipelineError, run_training  # noqa: E402

DEFAULT_DATA = REPO / ".." / "shared" / "data" / "hm_fashion_lastweek"
DEFAULT_OUT = REPO / "bench-out" / "pipeline"
TIME_LIMIT_S = 20 * 60  # the whole pipeline must fit in 20 minutes on a 2-core CPU host

log = logging.getLogger("bench_pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="canonical data folder (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="bundles go to OUT/bundles, summary to OUT.json"
    )
    parser.add_argument("--config", type=Path, help="YAML/JSON TrainConfig overrides (default: none)")
    parser.add_argument(
        "--work-dir", type=Path, help="stage cache, to resume an interrupted run (default: temporary)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = args.data.resolve()
    if not data.is_dir():
        print(f"bench_pipeline: data folder {data} not found; nothing to benchmark (pass --data DIR).")
        return 0
    try:
        cfg = config_from_file(args.config) if args.config else TrainConfig()
    except (ConfigFileError, TypeError, ValueError) as exc:
        print(f"bench_pipeline: error: {exc}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    try:
        result = run_training(
            data,
            args.out / "bundles",
            cfg,
            work_dir=args.work_dir,
            progress=not args.no_progress,
            device=args.device,
        )
    except (DataValidationError, PipelineError) as exc:
        print(f"bench_pipeline: error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - started

    print("\n== stage timings ==")
    print(report.timings_table(result.timings))
    print(
        f"total wall time: {total:.1f} s (limit {TIME_LIMIT_S} s) -> {'OK' if total <= TIME_LIMIT_S else 'OVER'}"
    )
    evaluation = result.metrics.get("evaluation", {})
    print("\n== metrics (test = last day; every system from this run) ==")
    print(report.console_table(evaluation))
    ann = result.metrics.get("ann", {})
    print(
        f"\nANN recall@{ann.get('k')} vs exact on {ann.get('users')} real user vectors: {ann.get('recall')}"
    )
    ft = result.metrics.get("finetune", {})
    print(
        f"fine-tuning: {ft.get('steps')} steps on {ft.get('pairs')} pairs; validation "
        f"Recall@{ft.get('valid_k')} {ft.get('valid_recall_before')} -> {ft.get('valid_recall_after')}"
    )
    print(f"bundle: {result.bundle_path}")

    summary = {
        "data": str(data),
        "version": result.version,
        "total_wall_s": total,
        "within_limit": total <= TIME_LIMIT_S,
        "timings": result.timings,
        "headline": result.metrics.get("headline"),
        "metrics": result.metrics,
    }
    out_json = args.out.with_suffix(".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary written to {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
