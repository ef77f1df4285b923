"""FAISS item index: exact (flat) vs HNSW vs IVF-flat (`IndexConfig.ann_kind`) at catalogue scale.

For 100k x 384 random unit item vectors and an H&M-sized catalogue (the item count of the shared
H&M data when present, else 105,542), reports build time, single-query and batched QPS at k=100,
and recall@100 against exact search. Queries imitate pooled user vectors: the normalised mean of a
few random items plus noise (uniformly random queries have no meaningful neighbours).
`--data clustered` draws items around n/100 random centres, closer to real text embeddings.
Random vectors are the hard case for graph indexes; real text embeddings are clustered, which
gives HNSW higher recall at the same efSearch.

IVF is searched by `recsvc.ivf_search` (which reads FAISS's lists in place); the `ivf-faiss` row
searches the same index with FAISS's own scan, in the same run, so the two compare directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recsvc.config import IndexConfig  # noqa: E402
from recsvc.retrieval import ItemIndex, exact_top_k, recall_at_k  # noqa: E402

log = logging.getLogger("bench_index")
HM_ITEMS = Path("/work/shared/data/hm_fashion_lastweek/items.parquet")
HM_ITEM_COUNT = 105_542


def hm_item_count() -> int:
    """Items in the shared H&M catalogue when it is present, else its documented size."""
    if HM_ITEMS.is_file():
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(HM_ITEMS).metadata.num_rows)
    log.info("H&M items not found at %s; using its documented size %d", HM_ITEMS, HM_ITEM_COUNT)
    return HM_ITEM_COUNT


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def item_vectors(n: int, dim: int, data: str, seed: int) -> np.ndarray:
    """Unit item vectors: i.i.d. random (hardest for graph indexes) or clustered like text embeddings."""
    rng = np.random.default_rng(seed)
    if data == "random":
        return unit(rng.normal(size=(n, dim)))
    centers = rng.normal(size=(max(1, n // 100), dim))
    labels = rng.integers(0, len(centers), n)
    return unit(centers[labels] + rng.normal(size=(n, dim)))


def pooled_queries(items: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(items), size=(n, 5))
    return unit(items[picks].mean(axis=1) + 0.05 * rng.normal(size=(n, items.shape[1])))


def qps(search: Any, queries: np.ndarray, k: int, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        search(queries[i : i + batch], k)
    return len(queries) / (time.perf_counter() - start)


def bench_size(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    items = item_vectors(n, args.dim, args.data, seed=n)
    queries = pooled_queries(items, args.queries, seed=n + 1)
    start = time.perf_counter()
    _, exact = exact_top_k(items, queries, args.k)
    log.info(
        "n=%d: exact top-%d for %d queries in %.1fs", n, args.k, len(queries), time.perf_counter() - start
    )
    rows = []
    for kind in tqdm(args.kinds, desc=f"{n} items", unit="index"):
        cfg = replace(
            IndexConfig(use_gpu="never", omp_threads=args.threads),
            exact_max_items=n if kind == "flat" else 0,
            ann_kind="ivf" if kind == "ivf" else "hnsw",
            hnsw_ef_search=args.ef_search,
            ivf_nprobe=args.nprobe,
        )
        start = time.perf_counter()
        index = ItemIndex.build(items, cfg)
        build_s = time.perf_counter() - start
        searches = {kind: index.search}
        if kind == "ivf":
            # the same index scanned by FAISS itself, beside `ivf_search` (which `index.search` uses)
            searches["ivf-faiss"] = lambda q, k, index=index: index.index.search(q, k)
        for name, search in searches.items():
            _, found = search(queries, args.k)
            row = {
                "n_items": n,
                "dim": args.dim,
                "kind": name,
                "data": args.data,
                "params": {
                    k: v
                    for k, v in index.params.items()
                    if k in ("M", "efConstruction", "efSearch", "nlist", "nprobe")
                },
                "build_s": round(build_s, 2),
                "qps_single": round(qps(search, queries[: args.single_queries], args.k, 1), 1),
                "qps_batched": round(qps(search, queries, args.k, args.batch), 1),
                f"recall@{args.k}": round(recall_at_k(found, exact), 4),
            }
            log.info("%s", row)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=None,
        help="catalogue sizes (default: 100000 and the H&M item count)",
    )
    parser.add_argument(
        "--dim", type=int, default=384, help="embedding dimension (default: %(default)s, MiniLM)"
    )
    parser.add_argument(
        "--kinds",
        nargs="*",
        default=["flat", "hnsw", "ivf"],
        choices=["flat", "hnsw", "ivf"],
        help="indexes to compare",
    )
    parser.add_argument(
        "--data",
        choices=["random", "clustered"],
        default="random",
        help="item vectors: i.i.d. random (worst case) or clustered, ~100 items per cluster (default: %(default)s)",
    )
    parser.add_argument("--k", type=int, default=100, help="neighbours per query (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for batched QPS and recall")
    parser.add_argument("--single-queries", type=int, default=300, help="queries timed one at a time")
    parser.add_argument(
        "--batch", type=int, default=256, help="batch size for batched QPS (default: %(default)s)"
    )
    parser.add_argument("--ef-search", type=int, default=IndexConfig().hnsw_ef_search, help="HNSW efSearch")
    parser.add_argument("--nprobe", type=int, default=IndexConfig().ivf_nprobe, help="IVF nprobe")
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = FAISS default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sizes = args.sizes or [100_000, hm_item_count()]
    log.info("FAISS %s, %d OpenMP threads", faiss.__version__, faiss.omp_get_max_threads())
    rows = [row for n in sizes for row in bench_size(n, args)]
    print(
        f"\n{'items':>8} {'kind':9} {'build s':>8} {'QPS 1':>8} {'QPS batch':>10} {'recall@' + str(args.k):>11}  params"
    )
    for r in rows:
        print(
            f"{r['n_items']:>8} {r['kind']:9} {r['build_s']:>8.1f} {r['qps_single']:>8.0f} {r['qps_batched']:>10.0f} "
            f"{r[f'recall@{args.k}']:>11.4f}  {r['params']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
