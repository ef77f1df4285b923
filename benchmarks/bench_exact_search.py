"""Exact top-k: the compiled kernel (`recsvc.exact_search`) vs FAISS flat search + rescoring.

`retrieval.ranked_search` answered exact (flat-index) searches with `IndexFlatIP.search` and then
rescored every found item (`item_emb[items] @ vector`, a lexsort for ties) so a user's candidates
did not depend on the batch. Since 2026-11-24 it calls `exact_search.top_k` instead. This script
times both on the same random unit vectors, interleaved round by round, one thread (as a server
worker runs), and checks they return the same items in the same order.

    .venv/bin/python benchmarks/bench_exact_search.py
    .venv/bin/python benchmarks/bench_exact_search.py --shapes 10000x64 50000x384 --batches 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recsvc import exact_search  # noqa: E402
from recsvc.retrieval import rescored  # noqa: E402


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_then_rescore(
    index: faiss.Index, emb: np.ndarray, queries: np.ndarray, depth: int
) -> list[np.ndarray]:
    """The previous path: FAISS's flat search, then an exact rescoring per query."""
    _, ids = index.search(queries, depth)
    return [rescored(emb, found[found >= 0], q)[0] for found, q in zip(ids, queries)]


def shape(text: str) -> tuple[int, int]:
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ITEMSxDIM such as 10000x64, got {text!r}") from None
    if n < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"items and dim must be >= 1, got {text!r}")
    return n, d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=shape, nargs="+", default=[(10_000, 64), (10_000, 384), (50_000, 384)])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="queries per call")
    p.add_argument("--depth", type=int, default=200, help="neighbours per query (the serving ANN depth)")
    p.add_argument("--queries", type=int, default=400, help="queries per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--out", type=Path, default=Path("bench-out/exact_search.json"))
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    rows = []
    print(f"exact top-{args.depth}, 1 thread, load average {os.getloadavg()[0]:.1f}")
    print(
        f"{'items x dim':>12} {'batch':>5} {'kernel ms/q':>12} {'faiss+rescore':>14} {'ratio':>6} {'same':>5}"
    )
    for n, d in args.shapes:
        emb = unit_rows(n, d, seed=0)
        index = faiss.IndexFlatIP(d)
        index.add(emb)
        queries = unit_rows(args.queries, d, seed=1)
        depth = min(args.depth, n)
        for batch in args.batches:
            chunks = [queries[i : i + batch] for i in range(0, len(queries), batch)]
            exact_search.top_k(emb, chunks[0], depth)  # load the compiled kernel
            same = all(
                a.tolist() == b.tolist()
                for c in chunks[:5]
                for a, b in zip(
                    exact_search.top_k(emb, c, depth)[0], faiss_then_rescore(index, emb, c, depth)
                )
            )
            kernel, old = [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                for c in chunks:
                    exact_search.top_k(emb, c, depth)
                kernel.append((time.perf_counter() - t) / len(queries) * 1e3)
                t = time.perf_counter()
                for c in chunks:
                    faiss_then_rescore(index, emb, c, depth)
                old.append((time.perf_counter() - t) / len(queries) * 1e3)
            k_ms, o_ms = float(np.median(kernel)), float(np.median(old))
            rows.append(
                {
                    "items": n,
                    "dim": d,
                    "batch": batch,
                    "kernel_ms_per_query": round(k_ms, 4),
                    "faiss_rescore_ms_per_query": round(o_ms, 4),
                    "same_items_and_order": same,
                }
            )
            print(f"{f'{n}x{d}':>12} {batch:>5} {k_ms:>12.3f} {o_ms:>14.3f} {o_ms / k_ms:>5.2f}x {same!s:>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"depth": args.depth, "rows": rows}, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
