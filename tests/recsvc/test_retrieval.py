from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsvc.config import IndexConfig
from recsvc.retrieval import (
    INDEX_FILE,
    META_FILE,
    GpuUnavailableError,
    IndexInputError,
    IndexLoadError,
    ItemIndex,
    gpu_available,
    ranked_search,
)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ emb.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


CPU = IndexConfig(use_gpu="never")
HNSW = IndexConfig(
    use_gpu="never",
    exact_max_items=100,
    ann_kind="hnsw",
    hnsw_m=16,
    hnsw_ef_construction=64,
    hnsw_ef_search=64,
)


def test_small_catalogue_uses_exact_index_matching_numpy_brute_force() -> None:
    emb, queries = unit_rows(500, 16), unit_rows(7, 16, seed=1)
    index = ItemIndex.build(emb, CPU)
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = brute_force(emb, queries, 10)
    assert index.kind == "flat"
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_k_larger_than_catalogue_pads_ids_with_minus_one() -> None:
    index = ItemIndex.build(unit_rows(5, 8), CPU)
    _, ids = index.search(unit_rows(2, 8, seed=3), 8)
    assert (ids[:, :5] >= 0).all()
    assert (ids[:, 5:] == -1).all()


def test_catalogue_above_threshold_uses_hnsw_with_high_recall() -> None:
    emb, queries = unit_rows(3000, 32), unit_rows(100, 32, seed=2)
    index = ItemIndex.build(emb, HNSW)
    recall = index.measure_recall(queries, 20)
    assert index.kind == "hnsw"
    assert index.params["M"] == 16 and index.params["efSearch"] == 64
    assert recall >= 0.9
    assert index.params["recall@20"] == pytest.approx(recall, abs=1e-5)


def test_measure_recall_of_exact_index_is_one() -> None:
    index = ItemIndex.build(unit_rows(50, 8), CPU)
    assert index.measure_recall(unit_rows(4, 8, seed=1), 5) == 1.0


def test_save_load_roundtrip_gives_identical_results(tmp_path: Path) -> None:
    emb, queries = unit_rows(1000, 16), unit_rows(20, 16, seed=5)
    index = ItemIndex.build(emb, HNSW)
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path, use_gpu="never")
    before, after = index.search(queries, 15), loaded.search(queries, 15)
    assert loaded.kind == "hnsw" and loaded.params == index.params
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert json.loads((tmp_path / META_FILE).read_text())["n"] == 1000


def test_filtered_search_returns_only_allowed_rows_in_exact_order() -> None:
    emb, queries = unit_rows(400, 16), unit_rows(5, 16, seed=7)
    allowed = np.zeros(400, dtype=bool)
    allowed[::3] = True
    excluded = [0, 3, 6]
    index = ItemIndex.build(emb, CPU)
    _, ids = index.search_with_filter(queries, 10, allowed=allowed, excluded=excluded)
    keep = np.flatnonzero(allowed)
    keep = keep[~np.isin(keep, excluded)]
    _, sub_ids = brute_force(emb[keep], queries, 10)
    np.testing.assert_array_equal(ids, keep[sub_ids])


def test_filtered_hnsw_search_never_returns_excluded_rows() -> None:
    emb, queries = unit_rows(2000, 16), unit_rows(10, 16, seed=8)
    index = ItemIndex.build(emb, HNSW)
    _, plain = index.search(queries, 10)
    excluded = np.unique(plain[:, :5])
    _, ids = index.search_with_filter(queries, 10, excluded=excluded)
    assert not np.isin(ids, excluded).any()
    assert (ids >= 0).all()


def test_missing_index_file_raises_error_naming_it(tmp_path: Path) -> None:
    ItemIndex.build(unit_rows(20, 8), CPU).save(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(IndexLoadError, match=r"index file missing: .*index\.faiss"):
        ItemIndex.load(tmp_path)


def test_corrupt_index_file_raises_error_naming_it(tmp_path: Path) -> None:
    ItemIndex.build(unit_rows(20, 8), CPU).save(tmp_path)
    data = (tmp_path / INDEX_FILE).read_bytes()
    (tmp_path / INDEX_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexLoadError, match=r"index\.faiss is corrupt"):
        ItemIndex.load(tmp_path)


def test_corrupt_metadata_raises_error_naming_it(tmp_path: Path) -> None:
    ItemIndex.build(unit_rows(20, 8), CPU).save(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(IndexLoadError, match=r"index\.json is corrupt"):
        ItemIndex.load(tmp_path)


def test_load_rejects_dimension_mismatch(tmp_path: Path) -> None:
    ItemIndex.build(unit_rows(20, 8), CPU).save(tmp_path)
    with pytest.raises(IndexLoadError, match="dimension 8 but the item embeddings have dimension 16"):
        ItemIndex.load(tmp_path, expected_dim=16)


def test_metadata_disagreeing_with_index_file_is_rejected(tmp_path: Path) -> None:
    ItemIndex.build(unit_rows(20, 8), CPU).save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "n": 21}))
    with pytest.raises(IndexLoadError, match="holds 20 vectors"):
        ItemIndex.load(tmp_path)


def test_unnormalised_embeddings_are_rejected_naming_the_row() -> None:
    emb = unit_rows(10, 8)
    emb[4] *= 2
    with pytest.raises(IndexInputError, match=r"row 4 has norm 2\.0000"):
        ItemIndex.build(emb, CPU)


def test_query_of_wrong_dimension_is_rejected() -> None:
    index = ItemIndex.build(unit_rows(10, 8), CPU)
    with pytest.raises(IndexInputError, match=r"shape \[n_queries, 8\]"):
        index.search(unit_rows(2, 4), 3)


def test_always_gpu_without_gpu_raises_clear_error() -> None:
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(GpuUnavailableError, match="use_gpu='always'"):
        gpu_available("always")
    assert gpu_available("auto") is False


def test_ivf_kind_above_threshold_has_high_recall_and_survives_save_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(30, 16))
    emb = centres[rng.integers(0, 30, 3000)] + 0.5 * rng.normal(size=(3000, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    queries = emb[rng.integers(0, 3000, 50)]
    index = ItemIndex.build(
        emb, IndexConfig(use_gpu="never", exact_max_items=100, ann_kind="ivf", ivf_nprobe=16)
    )
    recall = index.measure_recall(queries, 20)
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path, use_gpu="never")
    assert index.kind == "ivf" and index.params["nprobe"] == 16
    assert recall >= 0.9
    np.testing.assert_array_equal(loaded.search(queries, 20)[1], index.search(queries, 20)[1])


def test_unknown_ann_kind_is_rejected() -> None:
    with pytest.raises(IndexInputError, match="ann_kind must be 'hnsw' or 'ivf'"):
        ItemIndex.build(unit_rows(200, 8), IndexConfig(use_gpu="never", exact_max_items=10, ann_kind="lsh"))


def test_filtered_ivf_search_effort_scales_the_probed_lists() -> None:
    emb = unit_rows(3000, 16, seed=5)
    queries = unit_rows(40, 16, seed=6)
    index = ItemIndex.build(
        emb, IndexConfig(use_gpu="never", exact_max_items=100, ann_kind="ivf", ivf_nprobe=2)
    )
    allowed = np.arange(3000) % 3 != 0
    nlist = index.index.nlist
    exact = np.argsort(-np.where(allowed[None, :], queries @ emb.T, -np.inf), axis=1, kind="stable")[:, :10]
    _, every_list = index.search_with_filter(queries, 10, allowed=allowed, effort=nlist / 2)
    _, default = index.search_with_filter(queries, 10, allowed=allowed)
    _, narrow = index.search_with_filter(queries, 10, allowed=allowed, effort=0.01)  # one list
    np.testing.assert_array_equal(every_list, exact)  # probing every list is exact search
    np.testing.assert_array_equal(
        index.search_with_filter(queries, 10, allowed=allowed, effort=1.0)[1], default
    )
    assert (narrow != default).any() and allowed[narrow[narrow >= 0]].all()
    with pytest.raises(IndexInputError, match="effort"):
        index.search_with_filter(queries, 10, effort=0.0)


IVF = IndexConfig(use_gpu="never", exact_max_items=100, ann_kind="ivf", ivf_nprobe=8)


@pytest.mark.parametrize("cfg", [CPU, IVF, HNSW], ids=["flat", "ivf", "hnsw"])
def test_ranked_search_is_the_same_for_a_query_alone_or_in_a_batch(cfg: IndexConfig) -> None:
    emb = unit_rows(2000, 16, seed=5)
    index = ItemIndex.build(emb, cfg)
    vectors = [q for q in unit_rows(40, 16, seed=6)]
    batched = ranked_search(index, emb, vectors, 50)
    for v, (items, scores) in zip(vectors, batched):
        alone_items, alone_scores = ranked_search(index, emb, [v], 50)[0]
        assert items.tolist() == alone_items.tolist()
        assert scores.tobytes() == alone_scores.tobytes()


@pytest.mark.parametrize("cfg", [CPU, IVF, HNSW], ids=["flat", "ivf", "hnsw"])
def test_ranked_search_scores_are_inner_products_best_first_ties_by_item(cfg: IndexConfig) -> None:
    emb = unit_rows(1500, 16, seed=7)
    emb[1001] = emb[1000]  # an exact tie: the lower item index must come first
    emb[999] = emb[1000]
    index = ItemIndex.build(emb, cfg)
    (items, scores), none = ranked_search(index, emb, [emb[1000], None], 30)
    assert none[0].size == 0 and none[1].size == 0
    np.testing.assert_allclose(scores, emb[items] @ emb[1000], rtol=0, atol=1e-5)
    keys = list(zip((-scores.astype(np.float64)).tolist(), items.tolist()))
    assert keys == sorted(keys)
    assert items[:3].tolist() == [999, 1000, 1001]


def test_ivf_search_finds_faiss_neighbours_with_exact_inner_products_best_first() -> None:
    emb = unit_rows(3000, 16, seed=8)
    queries = unit_rows(60, 16, seed=9)
    index = ItemIndex.build(emb, IVF)
    scores, ids = index.search(queries, 25)
    _, faiss_ids = index.index.search(queries, 25, params=index._search_params(25))
    assert [set(row) for row in ids.tolist()] == [set(row) for row in faiss_ids.tolist()]
    exact = np.einsum("qkd,qd->qk", emb[ids].astype(np.float64), queries.astype(np.float64))
    np.testing.assert_allclose(scores, exact, rtol=0, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_ivf_search_breaks_score_ties_by_lower_item() -> None:
    emb = unit_rows(3000, 16, seed=10)
    emb[1001] = emb[1000]  # the same vector lands in the same list
    emb[999] = emb[1000]
    index = ItemIndex.build(emb, IVF)
    _, ids = index.search(emb[1000], 5)
    assert ids[0, :3].tolist() == [999, 1000, 1001]


def test_ivf_search_pads_like_faiss_when_the_probed_lists_hold_fewer_than_k() -> None:
    emb = unit_rows(3000, 16, seed=11)
    index = ItemIndex.build(
        emb, IndexConfig(use_gpu="never", exact_max_items=100, ann_kind="ivf", ivf_nprobe=1)
    )
    scores, ids = index.search(unit_rows(5, 16, seed=12), 500)  # one list of ~3000 / 76 items
    faiss_scores, faiss_ids = index.index.search(
        unit_rows(5, 16, seed=12), 500, params=index._search_params(500)
    )
    np.testing.assert_array_equal(ids < 0, faiss_ids < 0)
    assert (ids < 0).any()
    np.testing.assert_array_equal(scores[ids < 0], faiss_scores[faiss_ids < 0])


def test_filtered_ivf_search_finds_faiss_own_filtered_neighbours() -> None:
    import faiss

    emb = unit_rows(3000, 16, seed=13)
    queries = unit_rows(30, 16, seed=14)
    index = ItemIndex.build(emb, IVF)
    allowed = np.arange(3000) % 4 != 0
    scores, ids = index.search_with_filter(queries, 20, allowed=allowed, excluded=[5, 6, 7])
    allowed[[5, 6, 7]] = False
    bits = np.packbits(allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(3000, faiss.swig_ptr(bits))
    _, faiss_ids = index.index.search(queries, 20, params=index._search_params(20, selector))
    assert [set(row) for row in ids.tolist()] == [set(row) for row in faiss_ids.tolist()]
    assert allowed[ids[ids >= 0]].all()
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", emb[ids], queries), rtol=0, atol=1e-6)


def test_l2_ivf_index_is_searched_by_faiss_itself() -> None:
    import faiss

    from recsvc.ivf_search import IvfLists

    emb = unit_rows(2000, 8, seed=15)
    quantizer = faiss.IndexFlatL2(8)
    l2 = faiss.IndexIVFFlat(quantizer, 8, 16, faiss.METRIC_L2)
    l2.train(emb)
    l2.add(emb)
    assert IvfLists.of(l2) is None
    ip = ItemIndex.build(emb, IVF)
    assert IvfLists.of(ip.index) is not None


def test_ivf_layout_ivf_search_cannot_read_is_searched_by_faiss_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recsvc.ivf_search import IvfLists

    emb = unit_rows(3000, 16, seed=16)
    queries = unit_rows(20, 16, seed=17)
    index = ItemIndex.build(emb, IVF)
    kernel = index.search(queries, 15)[1], index.search_with_filter(queries, 15, excluded=[1, 2])[1]
    monkeypatch.setattr(IvfLists, "of", classmethod(lambda cls, index: None))  # a layout it cannot read
    index = ItemIndex(index.index, "ivf", index.params)
    faiss_path = index.search(queries, 15)[1], index.search_with_filter(queries, 15, excluded=[1, 2])[1]
    for ours, theirs in zip(kernel, faiss_path):
        assert [set(row) for row in ours.tolist()] == [set(row) for row in theirs.tolist()]
    assert not np.isin(faiss_path[1], [1, 2]).any()
