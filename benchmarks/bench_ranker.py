"""Ranker fast path vs stock LightGBM predict on one request's worth of candidate rows (issue 4).

Two models, both trained single-threaded on synthetic ranking groups (40 features):
  (a) "synthetic-300x63": 300 trees x 63 leaves, no early stopping (a large model);
  (b) "production-defaults": `RankerConfig()` as shipped (7 leaves, min_data_in_leaf 100,
      learning rate 0.05, up to 300 rounds, early stopping on a validation split of the same
      synthetic task; one search trial, i.e. the configured parameters).
For each, in ONE run, interleaved call by call so machine noise hits all alike, on the same rows:
  * stock `Booster.predict` with LightGBM's default threads (what issue 4 compares against),
  * stock `Booster.predict(num_threads=1)`,
  * `Ranker.predict` on the compiled, verified fast path (input checks + SIMD kernel + output),
  * optionally (--lleaves) the previous fast path: lleaves with kZeroThreshold zeroing.
It prints median / p99 per method and the ratios; the issue's ratio is "stock default / fast path".
Scores are also checked: the fast path must equal stock predict (bit-identical is expected).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
from recsvc.ranker import FAST_PATH_RTOL, K_ZERO_THRESHOLD, Ranker, threshold_probe  # noqa: E402

log = logging.getLogger("bench_ranker")
GROUP_SIZE = 50
ISSUE_TARGET = 5.0


def synthetic_groups(n_groups: int, size: int, n_features: int, seed: int) -> tuple[np.ndarray, ...]:
    """Candidate-like rows: dense, count-like and flag features, some missing; graded relevance.

    The relevance rule (feature weights) depends on `seed`: take training and validation groups
    from ONE call and split them, or they describe different tasks.
    """
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


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, desc: str) -> dict[str, np.ndarray]:
    """Per-call seconds for each function, calling them in turn so load spikes hit all of them.

    The order rotates every round: the call right after stock predict pays for LightGBM's OpenMP
    threads still spin-waiting (~0.1 ms on a busy 2-core box), so a fixed order would charge that
    to whichever method always came next.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    out: dict[str, list[int]] = {name: [] for name in fns}
    for i in tqdm(range(repeats), desc=desc, unit="round", mininterval=1.0):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter_ns()
            fns[name]()
            out[name].append(time.perf_counter_ns() - start)
    return {name: np.asarray(v, dtype=np.float64) / 1e9 for name, v in out.items()}


def train_models(args: argparse.Namespace) -> dict[str, Ranker]:
    """(a) 300x63 without early stopping and (b) the shipped RankerConfig defaults, same synthetic task."""
    n_train = args.groups
    x, y, g = synthetic_groups(n_train + args.groups // 3, GROUP_SIZE, args.features, seed=0)
    cut = n_train * GROUP_SIZE
    names = [f"f{i:02d}" for i in range(args.features)]
    large = RankerConfig(
        num_leaves=args.leaves,
        num_boost_round=args.trees,
        min_data_in_leaf=20,
        learning_rate=0.05,
        search_trials=1,
        num_threads=args.train_threads,
    )
    production = RankerConfig(search_trials=args.search_trials, num_threads=args.train_threads)
    models = {}
    start = time.perf_counter()
    models[f"synthetic-{args.trees}x{args.leaves}"] = Ranker.train(
        x[:cut], y[:cut], g[:n_train], None, None, None, large, feature_names=names
    )
    log.info("trained the %dx%d model in %.1fs", args.trees, args.leaves, time.perf_counter() - start)
    start = time.perf_counter()
    models["production-defaults"] = Ranker.train(
        x[:cut], y[:cut], g[:n_train], x[cut:], y[cut:], g[n_train:], production, feature_names=names
    )
    log.info("trained the production-defaults model in %.1fs", time.perf_counter() - start)
    return models


def lleaves_predict(booster: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The previous fast path (lleaves, rows zeroed at kZeroThreshold), for comparison only."""
    import lleaves

    with tempfile.TemporaryDirectory(prefix="bench-ranker-lleaves-") as tmp:  # read by init and compile
        model_file = Path(tmp) / "model.txt"
        model_file.write_text(booster.model_to_string())
        model = lleaves.Model(model_file=str(model_file))
        model.compile()

    def predict(x: np.ndarray) -> np.ndarray:
        rows = np.array(x, dtype=np.float64, order="C")
        rows[np.abs(rows) <= K_ZERO_THRESHOLD] = 0.0
        return model.predict(rows, n_jobs=1)

    return predict


def bench_model(
    name: str, ranker: Ranker, rows: np.ndarray, args: argparse.Namespace, cache: Path
) -> dict[str, Any]:
    """Compile (cold, then from cache), check scores, time the methods interleaved."""
    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        ranker.save(Path(tmp) / "ranker")
        start = time.perf_counter()
        Ranker.load(Path(tmp) / "ranker", cache_dir=cache)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        served = Ranker.load(Path(tmp) / "ranker", cache_dir=cache)
        cached_s = time.perf_counter() - start
    fast = served.fast_path
    if not fast.enabled:
        raise RuntimeError(f"{name}: fast path NOT enabled ({fast.reason})")
    booster = served.booster
    methods: dict[str, Callable[[], Any]] = {
        "stock_predict": lambda: booster.predict(rows),
        "stock_predict_1thread": lambda: booster.predict(rows, num_threads=1),
        "fast_predict": lambda: served.predict(rows),
    }
    if args.lleaves:
        previous = lleaves_predict(booster)
        methods["lleaves_previous"] = lambda: previous(rows)
    times = time_interleaved(methods, args.repeats, desc=f"timing {name}")
    stock = booster.predict(rows)
    probe = threshold_probe(booster)
    stock_probe = booster.predict(probe)
    got_rows, got_probe = served.predict(rows), served.predict(probe)
    diff = max(
        float(np.max(np.abs(got_rows - stock))),
        float(np.max(np.abs(got_probe - stock_probe))),
    )
    scale = max(1.0, float(np.max(np.abs(stock))))
    stats = {
        method: {"median_ms": float(np.median(t) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3)}
        for method, t in times.items()
    }
    fast_ms = stats["fast_predict"]["median_ms"]
    return {
        "model": name,
        "trees": booster.num_trees(),
        "leaves": int(served.meta["params"]["num_leaves"]),
        "rows": len(rows),
        "repeats": args.repeats,
        "load_with_compile_s": cold_s,
        "load_from_cache_s": cached_s,
        "timings": stats,
        "ratio_stock_default_over_fast": stats["stock_predict"]["median_ms"] / fast_ms,
        "ratio_stock_1thread_over_fast": stats["stock_predict_1thread"]["median_ms"] / fast_ms,
        **(
            {"ratio_lleaves_over_fast": stats["lleaves_previous"]["median_ms"] / fast_ms}
            if "lleaves_previous" in stats
            else {}
        ),
        "max_abs_diff": diff,
        "bit_identical": bool(np.array_equal(got_rows, stock) and np.array_equal(got_probe, stock_probe)),
        "equal_within_tolerance": diff <= FAST_PATH_RTOL * scale,
    }


def print_result(r: dict[str, Any]) -> None:
    print(
        f"\n[{r['model']}] {r['trees']} trees x {r['leaves']} leaves, {r['rows']} rows, {r['repeats']} interleaved calls each"
    )
    for method, s in r["timings"].items():
        print(f"  {method:24s} median {s['median_ms']:8.3f} ms   p99 {s['p99_ms']:8.3f} ms")
    verdict = "MET" if r["ratio_stock_default_over_fast"] >= ISSUE_TARGET else "NOT met"
    print(
        f"  ISSUE 4 RATIO stock default / fast path: x{r['ratio_stock_default_over_fast']:.2f} "
        f"(target >= {ISSUE_TARGET:g}: {verdict})"
    )
    print(f"  stock 1 thread / fast path:              x{r['ratio_stock_1thread_over_fast']:.2f}")
    if "ratio_lleaves_over_fast" in r:
        print(f"  previous lleaves path / fast path:       x{r['ratio_lleaves_over_fast']:.2f}")
    print(
        f"  scores: max |fast - stock| = {r['max_abs_diff']:.3g}, bit-identical: {r['bit_identical']}, "
        f"within tolerance: {r['equal_within_tolerance']}"
    )
    print(
        f"  load with compile {r['load_with_compile_s']:.1f}s, load from cache {r['load_from_cache_s']:.2f}s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=int, default=40, help="number of features (default: %(default)s)")
    parser.add_argument(
        "--trees", type=int, default=300, help="rounds of model (a), no early stopping (default: %(default)s)"
    )
    parser.add_argument(
        "--leaves", type=int, default=63, help="num_leaves of model (a) (default: %(default)s)"
    )
    parser.add_argument(
        "--search-trials",
        type=int,
        default=1,
        help="search trials for model (b); 1 = the shipped parameters only, "
        f"{RankerConfig().search_trials} = the shipped search (slower, may pick bigger trees) (default: %(default)s)",
    )
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="LightGBM training threads (default: %(default)s; OpenMP spin-waits badly on a shared machine)",
    )
    parser.add_argument(
        "--groups", type=int, default=1500, help="training groups of 50 rows (default: %(default)s)"
    )
    parser.add_argument(
        "--rows", type=int, default=500, help="rows per timed predict call (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=500, help="timed calls per method (default: %(default)s)"
    )
    parser.add_argument(
        "--lleaves", action="store_true", help="also time the previous lleaves fast path (compiles it: slow)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="compiled-model cache; default: a fresh temp dir, so the cold compile is measured",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    load_before = os.getloadavg()
    models = train_models(args)
    rows = synthetic_groups(args.rows // GROUP_SIZE + 1, GROUP_SIZE, args.features, seed=1)[0][: args.rows]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ranker-cache-") as tmp:
        cache = args.cache_dir or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        for name, ranker in models.items():
            try:
                results.append(bench_model(name, ranker, rows, args, cache))
            except RuntimeError as exc:
                print(str(exc), file=sys.stderr)
                return 1
    load_after = os.getloadavg()
    loads = " / ".join(f"{a:.2f},{b:.2f},{c:.2f}" for a, b, c in (load_before, load_after))
    print(f"\nload average (1,5,15 min) before / after: {loads} on {os.cpu_count()} CPUs")
    for result in results:
        print_result(result)
    print(
        "\nThe issue's ratio is 'stock default / fast path': the same rows, the same run, LightGBM's "
        "default predict call (all cores) against Ranker.predict."
    )
    if args.json:
        args.json.write_text(
            json.dumps({"load_average": [load_before, load_after], "results": results}, indent=2)
        )
    return 0 if all(r["equal_within_tolerance"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
