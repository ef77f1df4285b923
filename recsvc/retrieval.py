"""FAISS inner-product search over the catalogue's L2-normalised item embeddings.

Exact (`IndexFlatIP`) for catalogues up to `IndexConfig.exact_max_items`, HNSW (or IVF-flat with
`ann_kind="ivf"`) above it, so small catalogues never pay an approximation. On a GPU host (`faiss.get_num_gpus() > 0`, faiss-gpu
installed) search runs on the GPU: exact there up to `gpu_exact_max_items`, IVF-flat above
(HNSW has no GPU implementation). Whatever was searched on, `save` writes a CPU index, so every
bundle loads on CPU-only servers.

On CPU, unfiltered exact search does not go through FAISS: `ranked_search` scans the embeddings
with the compiled `exact_search.top_k` (exact, batch-independent, GIL released). IVF-flat
search, filtered or not, scans FAISS's own lists in place with the compiled `ivf_search.top_k`
(a batch reads each list once; the lists are picked by `exact_search`).

Filtered search (`search_with_filter`) keeps only allowed rows while it scans (FAISS
`IDSelectorBitmap` on CPU, or the same mask inside `ivf_search`), so a filter never
shortens the result list the way post-filtering would; on GPU, where FAISS has no selectors, it
over-fetches and filters, doubling the depth until `k` survivors are found.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsvc import exact_search, ivf_search
from recsvc.config import IndexConfig

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT_VERSION = 1
KINDS = ("flat", "hnsw", "ivf")
# FAISS GPU k-selection is limited to 2048 neighbours per query.
GPU_MAX_K = 2048
NORM_TOLERANCE = 1e-3


class IndexInputError(ValueError):
    """Embeddings or queries of the wrong shape, type or content."""


class IndexLoadError(RuntimeError):
    """A saved index that cannot be used: missing, corrupt or inconsistent file (named in the message)."""


class GpuUnavailableError(RuntimeError):
    """`use_gpu="always"` on a host where FAISS sees no GPU."""


def gpu_available(use_gpu: str) -> bool:
    """Whether to put the index on a GPU; `always` without one is an error, `never` never asks."""
    if use_gpu not in ("auto", "never", "always"):
        raise IndexInputError(f"IndexConfig.use_gpu must be 'auto', 'never' or 'always', got {use_gpu!r}")
    if use_gpu == "never":
        return False
    has_gpu_build = hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "index_cpu_to_gpu")
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    ok = has_gpu_build and n_gpus > 0
    if use_gpu == "always" and not ok:
        raise GpuUnavailableError(
            "IndexConfig.use_gpu='always' but FAISS sees no GPU "
            f"(GPU build: {has_gpu_build}, GPUs: {n_gpus}); install faiss-gpu on a CUDA host or use 'auto'"
        )
    return ok


def set_threads(omp_threads: int) -> None:
    """Process-wide FAISS OpenMP thread count; 0 keeps FAISS's default."""
    if omp_threads < 0:
        raise IndexInputError(f"IndexConfig.omp_threads must be >= 0, got {omp_threads}")
    if omp_threads:
        faiss.omp_set_num_threads(omp_threads)


def check_embeddings(emb: Any) -> np.ndarray:
    """float32 C-contiguous [n, d] with finite, unit-norm rows, or a precise IndexInputError."""
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise IndexInputError(
            f"item embeddings must be a non-empty 2-D array [n_items, dim], got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise IndexInputError(f"item embeddings must be floating point, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise IndexInputError(f"item embedding row {int(np.argmin(finite))} contains NaN or inf")
    norms = np.linalg.norm(arr, axis=1)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise IndexInputError(
            f"item embeddings must be L2-normalised (inner product = cosine); row {row} has norm {norms[row]:.4f}"
        )
    return arr


def exact_top_k(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k with FAISS's own flat index: the ground truth for recall."""
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(np.ascontiguousarray(emb, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, emb.shape[0]))


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k also returned."""
    hits = [len(set(f[f >= 0].tolist()) & set(e[e >= 0].tolist())) for f, e in zip(found, exact)]
    sizes = [int((e >= 0).sum()) for e in exact]
    return float(np.sum(hits) / max(1, np.sum(sizes)))


def _ivf_index(emb: np.ndarray, nprobe: int) -> tuple[faiss.Index, str, dict[str, Any]]:
    """IVF-flat with nlist = 4 sqrt(n) lists (trained here), searched over `nprobe` lists."""
    n, d = emb.shape
    nlist = int(min(65_536, max(1, min(n // 39, 4 * np.sqrt(n)))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(emb)
    ivf.nprobe = nprobe
    return ivf, "ivf", {"nlist": nlist, "nprobe": nprobe}


def _cpu_index(emb: np.ndarray, cfg: IndexConfig, on_gpu: bool) -> tuple[faiss.Index, str, dict[str, Any]]:
    """The CPU index to fill (and maybe move to GPU) plus its kind and parameters."""
    n, d = emb.shape
    if cfg.ann_kind not in ("hnsw", "ivf"):
        raise IndexInputError(f"IndexConfig.ann_kind must be 'hnsw' or 'ivf', got {cfg.ann_kind!r}")
    if on_gpu:
        if n <= cfg.gpu_exact_max_items:
            return faiss.IndexFlatIP(d), "flat", {}
        return _ivf_index(emb, cfg.ivf_nprobe)
    if n <= cfg.exact_max_items:
        return faiss.IndexFlatIP(d), "flat", {}
    if cfg.ann_kind == "ivf":
        return _ivf_index(emb, cfg.ivf_nprobe)
    hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
    hnsw.hnsw.efSearch = cfg.hnsw_ef_search
    params = {"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction, "efSearch": cfg.hnsw_ef_search}
    return hnsw, "hnsw", params


class ItemIndex:
    """Top-k inner-product search over item rows (id = catalogue row index).

    Safe for concurrent `search` calls from a thread pool: CPU searches only read the index (per-call
    `SearchParameters` instead of mutating efSearch); GPU searches are serialised by a lock because
    a `StandardGpuResources` is not thread-safe.
    """

    def __init__(
        self, index: faiss.Index, kind: str, params: dict[str, Any], *, on_gpu: bool = False
    ) -> None:
        if kind not in KINDS:
            raise IndexInputError(f"index kind must be one of {KINDS}, got {kind!r}")
        self.index = index
        self.kind = kind
        self.params = params
        self.on_gpu = on_gpu
        self._gpu_lock = threading.Lock()
        self._gpu_resources: Any = None

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def scores_per_query(self) -> bool:
        """Whether a query's returned scores are exact inner products computed for that query alone.

        True for CPU IVF-flat and HNSW-flat: each (query, item) product is computed on its own, so
        the bits never depend on which other queries share the call (and IVF's lists are picked
        by `ivf_search.probed_lists`, whose products do not depend on the batch either). The flat index scores a batch
        with one BLAS sgemm (and the GPU has its own kernels), whose rounding depends on the batch.
        """
        return not self.on_gpu and self.kind in ("ivf", "hnsw")

    @property
    def d(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return self.n

    # ----------------------------------------------------------------- build

    @classmethod
    def build(cls, emb: np.ndarray, cfg: IndexConfig | None = None) -> ItemIndex:
        """Exact up to `cfg.exact_max_items` rows, HNSW above (IVF-flat above `gpu_exact_max_items` on GPU)."""
        cfg = cfg or IndexConfig()
        arr = check_embeddings(emb)
        set_threads(cfg.omp_threads)
        on_gpu = gpu_available(cfg.use_gpu)
        start = time.perf_counter()
        cpu, kind, params = _cpu_index(arr, cfg, on_gpu)
        cpu.add(arr)
        params = {**params, "metric": "inner_product", "recall_sample_users": cfg.recall_sample_users}
        out = cls(cpu, kind, params)
        if on_gpu:
            out._to_gpu()
        params["build_seconds"] = round(time.perf_counter() - start, 3)
        log.info(
            "built %s index over %d items (dim %d) on %s in %.1fs",
            kind,
            out.n,
            out.d,
            "GPU" if out.on_gpu else "CPU",
            params["build_seconds"],
        )
        return out

    def _to_gpu(self) -> None:
        """Move flat/IVF indexes to GPU 0; HNSW stays on CPU (FAISS has no GPU HNSW)."""
        if self.kind == "hnsw":
            log.info("HNSW index stays on CPU: FAISS has no GPU HNSW")
            return
        self._gpu_resources = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        self.on_gpu = True

    def cpu_index(self) -> faiss.Index:
        """A CPU copy of the index (the index itself when it already lives on CPU)."""
        if self.on_gpu:
            return faiss.index_gpu_to_cpu(self.index)
        return self.index

    # ---------------------------------------------------------------- search

    def _queries(self, queries: Any) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.d:
            raise IndexInputError(f"queries must have shape [n_queries, {self.d}], got {np.shape(queries)}")
        if not np.issubdtype(q.dtype, np.floating) or not np.isfinite(q).all():
            raise IndexInputError("queries must be finite floating-point vectors")
        return np.ascontiguousarray(q, dtype=np.float32)

    def _check_k(self, k: int) -> None:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise IndexInputError(f"k must be a positive integer, got {k!r}")
        if self.on_gpu and k > GPU_MAX_K:
            raise IndexInputError(f"k={k} exceeds the FAISS GPU limit of {GPU_MAX_K} neighbours")

    def _search_params(self, k: int, selector: Any = None, effort: float = 1.0) -> Any:
        if self.kind == "hnsw":
            sp = faiss.SearchParametersHNSW()
            sp.efSearch = max(round(int(self.params.get("efSearch", 16)) * effort), int(k))
        elif self.kind == "ivf":
            sp = faiss.SearchParametersIVF()
            sp.nprobe = max(1, round(int(self.params.get("nprobe", 1)) * effort))
        else:
            if selector is None:
                return None
            sp = faiss.SearchParameters()
        if selector is not None:
            sp.sel = selector
        return sp

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [Q, k], ids int64 [Q, k]) best first; ids are -1 where fewer than k exist."""
        q = self._queries(queries)
        self._check_k(k)
        if self.on_gpu:
            with self._gpu_lock:
                scores, ids = self.index.search(q, int(k))
        else:
            scores, ids = self._cpu_search(q, int(k), self._search_params(k))
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def _cpu_search(self, q: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's search on CPU, except IVF-flat: `ivf_search` scans FAISS's lists itself (lists
        picked batch-independently, `ivf_search.probed_lists`). An IVF layout `ivf_search` does not
        read is left to FAISS; this project builds and loads none."""
        lists = self._ivf_lists if self.kind == "ivf" and params.sel is None else None
        if lists is not None:
            return ivf_search.top_k(lists, q, int(params.nprobe), k, faiss.omp_get_max_threads())
        return self.index.search(q, k, params=params)

    @functools.cached_property
    def _ivf_lists(self) -> ivf_search.IvfLists | None:
        """FAISS's IVF lists in memory, read on the first CPU search (None: not IVF-flat, or a
        layout `ivf_search` does not read). The index is never added to after it is built or
        loaded, so the addresses stay valid; read lazily so a GPU copy never holds the CPU one."""
        return ivf_search.IvfLists.of(self.index) if self.kind == "ivf" and not self.on_gpu else None

    def allowed_mask(
        self, allowed: np.ndarray | None = None, excluded: Iterable[int] | None = None
    ) -> np.ndarray:
        """Boolean [n] mask of searchable rows from an allow-mask and/or excluded row ids."""
        mask = np.ones(self.n, dtype=bool)
        if allowed is not None:
            a = np.asarray(allowed)
            if a.dtype != bool or a.shape != (self.n,):
                raise IndexInputError(
                    f"allowed must be a boolean mask of shape ({self.n},), got {a.dtype} {a.shape}"
                )
            mask &= a
        if excluded is not None:
            ex = np.fromiter((int(i) for i in excluded), dtype=np.int64)
            if ex.size and (ex.min() < 0 or ex.max() >= self.n):
                raise IndexInputError(f"excluded ids must be in [0, {self.n}), got {ex.min()}..{ex.max()}")
            mask[ex] = False
        return mask

    def search_with_filter(
        self,
        queries: Any,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        excluded: Iterable[int] | None = None,
        effort: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search` restricted to rows with `allowed[row]` and not in `excluded` (one filter for all queries).

        HNSW filters while walking the graph, so recall drops when the filter keeps a tiny fraction of
        the catalogue; an exact search over the allowed rows is then the better tool. `effort` scales
        the approximate index's search breadth (IVF nprobe, HNSW efSearch; at least 1 / k) for callers
        that trade recall for speed; exact indexes ignore it.
        """
        if not effort > 0:
            raise IndexInputError(f"effort must be > 0, got {effort}")
        q = self._queries(queries)
        self._check_k(k)
        mask = self.allowed_mask(allowed, excluded)
        if self.on_gpu:
            return self._overfetch(q, int(k), mask)
        if self.kind == "ivf" and (lists := self._ivf_lists) is not None:
            nprobe = int(self._search_params(k, None, effort).nprobe)
            return ivf_search.top_k(lists, q, nprobe, int(k), faiss.omp_get_max_threads(), allowed=mask)
        bits = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
        scores, ids = self._cpu_search(q, int(k), self._search_params(k, selector, effort))
        del bits  # the selector borrows this buffer until the search returns
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def _overfetch(self, q: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GPU filtering: search deeper (doubling, up to the GPU limit) and keep allowed rows."""
        scores_out = np.full((len(q), k), -np.finfo(np.float32).max, dtype=np.float32)
        ids_out = np.full((len(q), k), -1, dtype=np.int64)
        depth = min(self.n, GPU_MAX_K, k + int((~mask).sum()))
        while True:
            with self._gpu_lock:
                scores, ids = self.index.search(q, depth)
            full = True
            for row in range(len(q)):
                keep = (ids[row] >= 0) & mask[np.maximum(ids[row], 0)]
                got_ids, got_scores = ids[row][keep][:k], scores[row][keep][:k]
                ids_out[row, : len(got_ids)] = got_ids
                scores_out[row, : len(got_ids)] = got_scores
                full &= len(got_ids) == min(k, int(mask.sum()))
            if full or depth >= min(self.n, GPU_MAX_K):
                return scores_out, ids_out
            depth = min(self.n, GPU_MAX_K, depth * 2)

    # ---------------------------------------------------------------- recall

    def vectors(self) -> np.ndarray:
        """The stored item vectors (float32 [n, d]), read back from the index."""
        cpu = self.cpu_index()
        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(cpu)
            ivf.make_direct_map()
        return cpu.reconstruct_n(0, self.n)

    def measure_recall(self, queries: Any, k: int, *, seed: int = 0) -> float:
        """Recall@k of this index vs exact search on (a sample of) real user vectors; kept in `params`."""
        q = self._queries(queries)
        self._check_k(k)
        limit = int(self.params.get("recall_sample_users", len(q)) or len(q))
        if len(q) > limit:
            q = q[np.random.default_rng(seed).choice(len(q), limit, replace=False)]
        if self.kind == "flat":
            recall = 1.0
        else:
            _, exact = exact_top_k(self.vectors(), q, k)
            _, found = self.search(q, min(k, self.n))
            recall = recall_at_k(found, exact)
        self.params[f"recall@{k}"] = round(recall, 5)
        self.params["recall_users"] = len(q)
        log.info("%s index recall@%d = %.4f on %d user vectors", self.kind, k, recall, len(q))
        return recall

    # ------------------------------------------------------------- save/load

    def save(self, directory: str | os.PathLike[str]) -> None:
        """`index.faiss` (always a CPU index) and `index.json` (kind, n, d, params)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (INDEX_FILE + ".tmp")
        faiss.write_index(self.cpu_index(), str(tmp))
        os.replace(tmp, out / INDEX_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "n": self.n,
            "d": self.d,
            "params": self.params,
        }
        tmp_meta = out / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp_meta, out / META_FILE)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        use_gpu: str = "auto",
        *,
        expected_dim: int | None = None,
        omp_threads: int = 0,
    ) -> ItemIndex:
        """Read `save`'s files; IndexLoadError names the file that is missing, corrupt or inconsistent."""
        folder = Path(directory)
        meta_path, index_path = folder / META_FILE, folder / INDEX_FILE
        for path in (meta_path, index_path):
            if not path.is_file():
                raise IndexLoadError(f"index file missing: {path}")
        try:
            meta = json.loads(meta_path.read_text())
            kind, n, d, params = meta["kind"], int(meta["n"]), int(meta["d"]), dict(meta["params"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexLoadError(f"index metadata {meta_path} is corrupt: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexLoadError(
                f"{meta_path} has format_version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}"
            )
        if kind not in KINDS:
            raise IndexLoadError(f"{meta_path} names unknown index kind {kind!r}")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IndexLoadError(f"index file {index_path} is corrupt or unreadable: {first_line}") from exc
        if index.d != d or index.ntotal != n:
            raise IndexLoadError(
                f"{index_path} holds {index.ntotal} vectors of dim {index.d} but {meta_path} says {n} of dim {d}"
            )
        if expected_dim is not None and d != expected_dim:
            raise IndexLoadError(
                f"{index_path} has dimension {d} but the item embeddings have dimension {expected_dim}"
            )
        set_threads(omp_threads)
        out = cls(index, kind, params)
        if gpu_available(use_gpu):
            out._to_gpu()
        log.info(
            "loaded %s index (%d items, dim %d) from %s on %s",
            kind,
            n,
            d,
            folder,
            "GPU" if out.on_gpu else "CPU",
        )
        return out


def best_first(scores: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The order of `items` by descending score, ties by item index: the same whatever the batch."""
    return np.lexsort((items, -np.asarray(scores, dtype=np.float64)))


def rescored(item_emb: np.ndarray, items: np.ndarray, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`items` (int32) and their exact inner products with `vector` (float32), best first."""
    items = np.asarray(items).astype(np.int32)
    exact = item_emb[items] @ np.asarray(vector, dtype=np.float32)
    order = best_first(exact, items)
    return items[order], exact[order].astype(np.float32)


# Queries per FAISS call in `ranked_search` (bounds the [queries, depth] result matrices).
SEARCH_BATCH = 1024


def ranked_search(
    index: ItemIndex, item_emb: np.ndarray, vectors: Sequence[np.ndarray | None], depth: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per vector, its `depth` nearest items (int32) and their inner products (float32), best
    first with ties broken by item index; empty arrays for a None vector.

    Why one function: serving (one user, or a micro-batch) and the offline jobs (training the
    ranker, recsvc-batch) must give a user the same candidates whatever the batch, so scores are
    exact and the order is total. When the index scores each query on its own
    (`ItemIndex.scores_per_query`) its scores are used as they are; otherwise every found item is
    rescored as `item_emb[item] @ vector` (a gather and a product per row, which is why the
    per-query indexes skip it). The CPU flat index is not searched at all: `exact_search.top_k`
    scans `item_emb` itself, exact and batch-independent by construction, so it needs no rescoring.
    """
    empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    out: list[tuple[np.ndarray, np.ndarray]] = [empty] * len(vectors)
    rows = [i for i, v in enumerate(vectors) if v is not None]
    if depth <= 0:
        return out
    depth = min(depth, index.n)
    if index.kind == "flat" and not index.on_gpu and rows:
        table = np.ascontiguousarray(item_emb, dtype=np.float32)
        queries = index._queries(np.vstack([np.asarray(vectors[i], dtype=np.float32) for i in rows]))
        ids, scores = exact_search.top_k(table, queries, min(depth, len(table)), faiss.omp_get_max_threads())
        for j, row in enumerate(rows):
            out[row] = (ids[j], scores[j])
        return out
    for start in range(0, len(rows), SEARCH_BATCH):
        chunk = rows[start : start + SEARCH_BATCH]
        queries = np.vstack([np.asarray(vectors[i], dtype=np.float32) for i in chunk])
        scores, ids = index.search(queries, depth)
        if not index.scores_per_query:
            for row, found in zip(chunk, ids):
                out[row] = rescored(item_emb, found[found >= 0], vectors[row])  # type: ignore[arg-type]
            continue
        ids32 = ids.astype(np.int32)
        # FAISS returns each row best first; only rows holding equal scores need the item tie-break
        redo = (ids32 < 0).any(axis=1) | (scores[:, 1:] == scores[:, :-1]).any(axis=1)
        for j, row in enumerate(chunk):
            if not redo[j]:
                out[row] = (ids32[j], scores[j])
                continue
            keep = ids32[j] >= 0
            found, found_scores = ids32[j][keep], scores[j][keep]
            order = best_first(found_scores, found)
            out[row] = (found[order], found_scores[order])
    return out
