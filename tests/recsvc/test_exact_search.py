import numpy as np
import pytest

from recsvc import exact_search


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(emb: np.ndarray, q: np.ndarray, depth: int) -> np.ndarray:
    """The definition: items by descending exact (float64) inner product, ties by lower item."""
    scores = emb.astype(np.float64) @ q.astype(np.float64)
    return np.lexsort((np.arange(len(emb)), -scores))[:depth]


def test_top_k_returns_the_exact_best_items_best_first() -> None:
    emb = unit_rows(3001, 24, seed=1)
    queries = unit_rows(9, 24, seed=2)
    ids, scores = exact_search.top_k(emb, queries, 50)
    for q, row_ids, row_scores in zip(queries, ids, scores):
        assert row_ids.tolist() == reference(emb, q, 50).tolist()
        np.testing.assert_allclose(row_scores, emb[row_ids] @ q, rtol=0, atol=1e-6)
    assert ids.dtype == np.int32 and scores.dtype == np.float32


def test_equal_scores_go_to_the_lower_item_index_also_at_the_cut() -> None:
    emb = unit_rows(500, 8, seed=3)
    emb[[10, 200, 499]] = emb[7]  # four copies of item 7's vector
    ids, scores = exact_search.top_k(emb, emb[7][None, :], 3)
    assert ids[0].tolist() == [7, 10, 200]  # 499 ties with them but is cut, being the highest index
    assert scores[0][0] == scores[0][1] == scores[0][2]


@pytest.mark.parametrize("dim", [40, 64, 384])  # 64 and 384: the benchmark's and MiniLM's sizes
def test_a_query_gets_the_same_bits_alone_or_in_any_batch(dim: int) -> None:
    """Four-query groups and the one-query remainder are separate loops that LLVM vectorises on
    its own; this is the guard that they still round alike."""
    emb = unit_rows(2000, dim, seed=4)
    queries = unit_rows(71, dim, seed=5)  # crosses the 4-query groups and the chunks (8 or 32 queries)
    ids, scores = exact_search.top_k(emb, queries, 60)
    for j in (0, 3, 32, 70):
        alone_ids, alone_scores = exact_search.top_k(emb, queries[j : j + 1], 60)
        assert alone_ids[0].tolist() == ids[j].tolist()
        assert alone_scores[0].tobytes() == scores[j].tobytes()


@pytest.mark.parametrize(("dim", "chunk"), [(16, 32), (64, 32), (128, 32), (384, 8), (768, 4), (8192, 4)])
def test_a_chunk_holds_as_many_queries_as_fit_in_l1_in_fours(dim: int, chunk: int) -> None:
    assert exact_search.chunk_size(dim) == chunk
    assert chunk * dim * 4 <= exact_search.L1_QUERY_BYTES or chunk == 4


def test_threads_split_the_queries_without_changing_any_answer() -> None:
    emb = unit_rows(1000, 16, seed=6)
    queries = unit_rows(100, 16, seed=7)
    one = exact_search.top_k(emb, queries, 25, threads=1)
    three = exact_search.top_k(emb, queries, 25, threads=3)
    assert one[0].tobytes() == three[0].tobytes() and one[1].tobytes() == three[1].tobytes()


@pytest.mark.parametrize("n, depth", [(10, 10), (10, 1), (1, 1), (103, 10)])
def test_every_depth_up_to_the_catalogue_size_is_answered_in_full(n: int, depth: int) -> None:
    emb = unit_rows(n, 4, seed=8)
    q = unit_rows(1, 4, seed=9)
    ids, _ = exact_search.top_k(emb, q, depth)
    assert ids[0].tolist() == reference(emb, q[0], depth).tolist()


def test_a_query_scoring_every_item_equal_gets_the_first_items_in_order() -> None:
    emb = unit_rows(300, 6, seed=10)
    ids, scores = exact_search.top_k(emb, np.zeros((1, 6), np.float32), 20)
    assert ids[0].tolist() == list(range(20)) and not scores.any()


def test_no_queries_give_empty_results() -> None:
    ids, scores = exact_search.top_k(unit_rows(50, 4, seed=11), np.zeros((0, 4), np.float32), 5)
    assert ids.shape == (0, 5) and scores.shape == (0, 5)


@pytest.mark.parametrize("depth", [0, 51])
def test_a_depth_outside_the_catalogue_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        exact_search.top_k(unit_rows(50, 4, seed=12), unit_rows(1, 4, seed=13), depth)


def test_items_after_the_last_whole_row_of_groups_are_searched_too() -> None:
    emb = unit_rows(1003, 8, seed=14)  # depth 5 -> 20 strided groups of 50 rows, 3 items left over
    q = emb[1002]
    ids, _ = exact_search.top_k(emb, q[None, :], 5)
    assert ids[0][0] == 1002 and ids[0].tolist() == reference(emb, q, 5).tolist()
