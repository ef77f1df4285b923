import faiss
import numpy as np
import pytest

from recsvc import ivf_search


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ivf_flat(emb: np.ndarray, nlist: int) -> faiss.Index:
    index = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(emb.shape[1]), emb.shape[1], nlist, faiss.METRIC_INNER_PRODUCT
    )
    index.train(emb)
    index.add(emb)
    return index


def lists_of(emb: np.ndarray, nlist: int) -> ivf_search.IvfLists:
    return lists_and_assignment(emb, nlist)[0]


def lists_and_assignment(emb: np.ndarray, nlist: int) -> tuple[ivf_search.IvfLists, np.ndarray]:
    """The index's lists and each item's list (what `reference` needs)."""
    index = ivf_flat(emb, nlist)
    lists = ivf_search.IvfLists.of(index)
    assert lists is not None
    _, assignment = index.quantizer.search(emb, 1)
    return lists, assignment[:, 0]


def reference(
    emb: np.ndarray,
    centroids: np.ndarray,
    assignment: np.ndarray,
    q: np.ndarray,
    nprobe: int,
    depth: int,
    allowed: np.ndarray | None = None,
) -> list[int]:
    """The definition: the `nprobe` lists with the highest centroid products (ties: lower list),
    then their items by descending exact inner product, ties by lower item."""
    c = centroids.astype(np.float64) @ q.astype(np.float64)
    lists = np.lexsort((np.arange(len(c)), -c))[:nprobe]
    in_lists = np.isin(assignment, lists)
    items = np.flatnonzero(in_lists if allowed is None else in_lists & allowed)
    s = emb[items].astype(np.float64) @ q.astype(np.float64)
    return items[np.lexsort((items, -s))][:depth].tolist()


def test_top_k_is_the_best_items_of_the_best_lists_best_first() -> None:
    emb = unit_rows(4000, 16, seed=1)
    lists, assignment = lists_and_assignment(emb, 40)
    queries = unit_rows(20, 16, seed=2)
    scores, ids = ivf_search.top_k(lists, queries, 5, 30)
    for q, row_ids, row_scores in zip(queries, ids, scores):
        assert row_ids.tolist() == reference(emb, lists.centroids, assignment, q, 5, 30)
        np.testing.assert_allclose(row_scores, emb[row_ids] @ q, rtol=0, atol=1e-6)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_allowed_keeps_only_allowed_items_of_the_same_lists() -> None:
    emb = unit_rows(4000, 16, seed=13)
    lists, assignment = lists_and_assignment(emb, 40)
    allowed = np.random.default_rng(14).random(4000) < 0.3
    queries = unit_rows(10, 16, seed=15)
    _, ids = ivf_search.top_k(lists, queries, 5, 30, allowed=allowed)
    for q, row_ids in zip(queries, ids):
        assert row_ids.tolist() == reference(emb, lists.centroids, assignment, q, 5, 30, allowed)
        assert allowed[row_ids].all()


@pytest.mark.parametrize("dim", [40, 64, 384])  # 64 and 384: the benchmark's and MiniLM's sizes
def test_a_query_gets_the_same_bits_alone_or_in_any_batch(dim: int) -> None:
    """Alone, a query's lists are scanned by the one-query loop; in a batch, mostly by the
    four-query loop (every list here is probed by ~57 queries), with the rest one at a time."""
    emb = unit_rows(3000, dim, seed=3)
    lists = lists_of(emb, 30)
    queries = unit_rows(ivf_search.CHUNK + 30, dim, seed=4)  # two chunks, lists shared by many
    scores, ids = ivf_search.top_k(lists, queries, 6, 50)
    for j in range(len(queries)):
        alone_scores, alone_ids = ivf_search.top_k(lists, queries[j : j + 1], 6, 50)
        assert alone_ids[0].tolist() == ids[j].tolist()
        assert alone_scores[0].tobytes() == scores[j].tobytes()


def test_threads_split_the_queries_without_changing_any_answer() -> None:
    emb = unit_rows(2000, 16, seed=5)
    lists = lists_of(emb, 20)
    queries = unit_rows(3 * ivf_search.CHUNK + 7, 16, seed=6)
    one = ivf_search.top_k(lists, queries, 4, 25, threads=1)
    three = ivf_search.top_k(lists, queries, 4, 25, threads=3)
    assert one[0].tobytes() == three[0].tobytes() and one[1].tobytes() == three[1].tobytes()


def test_probed_lists_are_those_with_the_highest_centroid_products_ties_by_lower_list() -> None:
    # integer centroids: every product is exact, and lists 1 and 2 (also 3 and 5) tie
    centroids = np.array(
        [[1, 0, 0, 0], [2, 1, 0, 0], [2, 1, 0, 0], [0, 3, 0, 0], [0, 0, 1, 0], [0, 3, 0, 0]], np.float32
    )
    queries = np.array([[1, 1, 0, 0], [0, 1, 0, 0]], np.float32)
    lists, products = ivf_search.probed_lists(centroids, queries, 3)
    assert lists.tolist() == [[1, 2, 3], [3, 5, 1]]
    assert products.tolist() == [[3, 3, 3], [3, 3, 1]]


def test_fewer_vectors_than_depth_are_padded_with_minus_one_after_every_found_item() -> None:
    emb = unit_rows(300, 8, seed=7)
    lists = lists_of(emb, 10)
    scores, ids = ivf_search.top_k(lists, unit_rows(3, 8, seed=8), 1, 200)  # one list: ~30 items
    for row_ids, row_scores in zip(ids, scores):
        found = row_ids >= 0
        n = int(found.sum())
        assert 0 < n < 200 and found[:n].all()
        assert (row_scores[n:] == ivf_search.PAD_SCORE).all()


def test_nprobe_beyond_the_list_count_searches_every_list() -> None:
    emb = unit_rows(500, 8, seed=9)
    lists = lists_of(emb, 8)
    q = unit_rows(1, 8, seed=10)
    _, ids = ivf_search.top_k(lists, q, 100, 20)
    exact = np.lexsort((np.arange(500), -(emb.astype(np.float64) @ q[0].astype(np.float64))))[:20]
    assert ids[0].tolist() == exact.tolist()


def test_depth_below_one_is_rejected() -> None:
    emb = unit_rows(100, 4, seed=11)
    lists = lists_of(emb, 4)
    with pytest.raises(ValueError, match="depth"):
        ivf_search.top_k(lists, unit_rows(1, 4, seed=12), 2, 0)
