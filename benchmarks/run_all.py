"""Run every benchmark in sequence and keep going when one fails (`make bench`).

Each benchmark is its own script so it can be run alone; this runner only sequences them,
records wall time and exit status, and prints a summary. Benchmarks that need the shared
H&M data exit cleanly with a message when it is absent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench_pipeline publishes the H&M bundle that bench_batch and bench_ab_sim then use.
ORDER = (
    "bench_ranker.py",
    "bench_index.py",
    "bench_exact_search.py",
    "bench_embed.py",
    "bench_baselines.py",
    "bench_pipeline.py",
    "bench_serve.py",
    "bench_batch.py",
    "bench_ab_sim.py",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only", nargs="*", default=None, help="benchmark script names to run (default: all, in order)"
    )
    args = parser.parse_args(argv)
    names = args.only or [n for n in ORDER if (HERE / n).exists()]
    results: list[tuple[str, int, float]] = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / name)], cwd=HERE.parent)
        results.append((name, rc, time.perf_counter() - start))
    print("\n=== summary ===")
    for name, rc, secs in results:
        print(f"{name:24s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {secs:8.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
