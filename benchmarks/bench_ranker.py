"""Ranker fast path vs stock LightGBM predict on one request's worth of candidate rows.

Trains a realistic lambdarank model on synthetic ranking groups (~40 features, 300 trees, 63
leaves), then times, interleaved call by call so machine noise hits both alike:
  * stock `Booster.predict` (LightGBM's default threads, and num_threads=1),
  * `Ranker.predict` on the compiled, verified fast path (lleaves),
on `--rows` rows, reporting median / p99 and the speed-up, plus cold compile time, cached
reload time and the max |score difference| (the fast path must match to 1e-6 of score scale).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recsvc.config import RankerConfig  # noqa: E402
from recsvc.ranker import FAST_PATH_RTOL, Ranker, threshold_probe  # noqa: E402

log = logging.getLogger("bench_ranker")


def synthetic_groups(n_groups: int, size: int, n_features: int, seed: int) -> tuple[np.ndarray, ...]:
    """Candidate-like rows: dense, count-like and flag features, some missing; graded relevance."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_groups * size, n_features)).astype(np.float32)
    counts = n_features // 4
    x[:, :counts] = rng.poisson(2.0, size=(len(x), counts))
    x[:, counts : 2 * counts] = rng.random((len(x), counts)) < 0.15
    x[rng.random(x.shape) < 0.05] = np.nan
    weights = rng.normal(size=n_features) * (rng.random(n_features) < 0.5)
    utility = np.nan_to_num(x) @ weights + rng.normal(scale=2.0, size=len(x))
    y = np.zeros(len(x), dtype=np.int32)
    for g in range(n_groups):
        rows = np.arange(g * size, (g + 1) * size)
        order = rows[np.argsort(-utility[rows])]
        y[order[:2]] = 2
        y[order[2:6]] = 1
    return x, y, np.full(n_groups, size)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, np.ndarray]:
    """Per-call seconds for each function, calling them in turn so load spikes hit all of them."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="timing predict", unit="round", mininterval=1.0):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return {name: np.asarray(v) for name, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=int, default=40, help="number of features (default: %(default)s)")
    parser.add_argument(
        "--trees", type=int, default=300, help="boosting rounds, no early stopping (default: %(default)s)"
    )
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="LightGBM training threads (default: %(default)s; OpenMP spin-waits badly on a shared machine)",
    )
    parser.add_argument("--leaves", type=int, default=63, help="num_leaves per tree (default: %(default)s)")
    parser.add_argument(
        "--groups", type=int, default=1500, help="training groups of 50 rows (default: %(default)s)"
    )
    parser.add_argument(
        "--rows", type=int, default=500, help="rows per timed predict call (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1000, help="timed calls per method (default: %(default)s)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="lleaves object cache; default: a fresh temp dir, so the cold compile is measured",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    x, y, g = synthetic_groups(args.groups, 50, args.features, seed=0)
    names = [f"f{i:02d}" for i in range(args.features)]
    cfg = RankerConfig(
        num_leaves=args.leaves,
        num_boost_round=args.trees,
        min_data_in_leaf=20,
        learning_rate=0.05,
        search_trials=1,
        num_threads=args.train_threads,
    )
    start = time.perf_counter()
    ranker = Ranker.train(x, y, g, None, None, None, cfg, feature_names=names)
    train_s = time.perf_counter() - start
    log.info(
        "trained %d trees x %d leaves on %d rows in %.1fs",
        ranker.booster.num_trees(),
        args.leaves,
        len(x),
        train_s,
    )

    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        ranker.save(Path(tmp) / "ranker")
        start = time.perf_counter()
        Ranker.load(Path(tmp) / "ranker", cache_dir=cache)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = Ranker.load(Path(tmp) / "ranker", cache_dir=cache)
        cached_s = time.perf_counter() - start
    if not warm.fast_path.enabled:
        print(f"fast path NOT enabled ({warm.fast_path.reason}); nothing to compare", file=sys.stderr)
        return 1
    log.info(
        "load with compile %.1fs (cache %s), load from cache %.2fs",
        cold_s,
        "reused" if args.cache_dir else "cold",
        cached_s,
    )

    rows = synthetic_groups(args.rows // 50 + 1, 50, args.features, seed=1)[0][: args.rows]
    booster = warm.booster
    times = time_interleaved(
        {
            "stock_predict": lambda: booster.predict(rows),
            "stock_predict_1thread": lambda: booster.predict(rows, num_threads=1),
            "fast_predict": lambda: warm.predict(rows),
        },
        args.repeats,
    )
    stock = booster.predict(rows)
    probe = threshold_probe(booster)
    diff = max(
        float(np.max(np.abs(warm.predict(rows) - stock))),
        float(np.max(np.abs(warm.predict(probe) - booster.predict(probe)))),
    )
    scale = max(1.0, float(np.max(np.abs(stock))))
    stats = {
        name: {"median_ms": float(np.median(t) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3)}
        for name, t in times.items()
    }
    result = {
        "trees": booster.num_trees(),
        "leaves": args.leaves,
        "features": args.features,
        "rows": args.rows,
        "repeats": args.repeats,
        "train_s": train_s,
        "load_with_compile_s": cold_s,
        "load_from_cache_s": cached_s,
        "timings": stats,
        "speedup_vs_stock_median": stats["stock_predict"]["median_ms"] / stats["fast_predict"]["median_ms"],
        "speedup_vs_stock_1thread_median": stats["stock_predict_1thread"]["median_ms"]
        / stats["fast_predict"]["median_ms"],
        "max_abs_diff": diff,
        "equal_within_tolerance": diff <= FAST_PATH_RTOL * scale,
    }
    print(
        f"\nranker predict on {args.rows} rows ({booster.num_trees()} trees x {args.leaves} leaves, {args.features} features)"
    )
    for name, s in stats.items():
        print(f"  {name:24s} median {s['median_ms']:7.3f} ms   p99 {s['p99_ms']:7.3f} ms")
    print(f"  speed-up vs stock predict:           x{result['speedup_vs_stock_median']:.2f} (target >= 5)")
    print(f"  speed-up vs stock predict, 1 thread: x{result['speedup_vs_stock_1thread_median']:.2f}")
    print(
        f"  max |fast - stock| = {diff:.3g} (tolerance {FAST_PATH_RTOL * scale:.3g}) -> equal: {result['equal_within_tolerance']}"
    )
    print(f"  load with compile {cold_s:.1f}s, load from cache {cached_s:.2f}s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["equal_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
