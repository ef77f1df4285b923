from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.collaborative import CFModel, fold_in, user_confidences
from recsvc.config import DAY
from recsvc.history import UserHistory

NOW = 100 * DAY


def _factors(n_items: int = 30, f: int = 4, seed: int = 0, zero_rows: tuple[int, ...] = ()) -> np.ndarray:
    y = np.random.default_rng(seed).normal(size=(n_items, f)).astype(np.float32)
    y[list(zero_rows)] = 0.0
    return y


def test_fold_in_equals_implicits_recalculate_user() -> None:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(3)
    dense = (rng.random((40, 25)) < 0.15) * rng.choice([1.0, 2.0, 8.0], size=(40, 25))
    dense[:, 0] = 1.0  # every user and item has an event
    dense[0, :] = 1.0
    matrix = sp.csr_matrix(dense.astype(np.float32))
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=6, regularization=0.1, iterations=5, alpha=2.0, random_state=1, num_threads=1
        )
        model.fit(matrix, show_progress=False)
        y = np.asarray(model.item_factors, dtype=np.float32)
        row = matrix[7]
        expected = np.asarray(model.recalculate_user(7, row), dtype=np.float64).ravel()
    items = row.indices.astype(np.int64)
    got = fold_in(y, y.astype(np.float64).T @ y.astype(np.float64), items, 2.0 * row.data, 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_fold_in_is_the_weighted_least_squares_solution_over_all_items() -> None:
    """Implicit ALS: minimise sum_i c_i (p_i - x.y_i)^2 + reg |x|^2, c_i = 1 and p_i = 0 off-history."""
    y = _factors(12, 3, seed=5).astype(np.float64)
    items = np.array([1, 4, 9])
    conf = np.array([3.0, 1.5, 9.0])
    c = np.ones(12)
    p = np.zeros(12)
    c[items] = conf
    p[items] = 1.0
    w = np.sqrt(c)[:, None]
    design = np.vstack([w * y, np.sqrt(0.3) * np.eye(3)])
    target = np.concatenate([np.sqrt(c) * p, np.zeros(3)])
    expected = np.linalg.lstsq(design, target, rcond=None)[0]
    got = fold_in(y.astype(np.float32), y.T @ y, items, conf, 0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_confidences_sum_repeated_events_and_decay_with_age() -> None:
    items, conf = user_confidences(
        np.array([5, 2, 5]), np.array([NOW - DAY, NOW, NOW]), np.array([1.0, 8.0, 2.0]), NOW, 2.0, 1.0
    )
    assert items.tolist() == [2, 5]
    np.testing.assert_allclose(conf, [16.0, 2.0 * (0.5 + 2.0)])
    _, flat = user_confidences(np.array([5, 5]), np.array([NOW - 9 * DAY, NOW]), np.ones(2), NOW, 1.0, 0.0)
    assert flat.tolist() == [2.0]


def test_user_factor_is_none_without_history_or_without_factored_items() -> None:
    model = CFModel(_factors(zero_rows=(3, 4)), 0.1, 1.0, 0.0)
    assert model.user_factor(UserHistory.empty(), NOW) is None
    only_cold = UserHistory(
        np.array([3, 4], np.int32), np.array([NOW, NOW], np.int64), np.ones(2, np.float32)
    )
    assert model.user_factor(only_cold, NOW) is None


def test_user_factor_ignores_items_without_a_factor() -> None:
    model = CFModel(_factors(zero_rows=(3,)), 0.1, 1.0, 0.0)
    ts = np.full(3, NOW, np.int64)
    with_cold = UserHistory(np.array([1, 3, 7], np.int32), ts, np.ones(3, np.float32))
    without = UserHistory(np.array([1, 7], np.int32), ts[:2], np.ones(2, np.float32))
    np.testing.assert_array_equal(model.user_factor(with_cold, NOW), model.user_factor(without, NOW))


def test_scores_are_nan_for_items_without_a_factor() -> None:
    y = _factors(zero_rows=(2,))
    model = CFModel(y, 0.1, 1.0, 0.0)
    user = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    scores = model.scores(user, np.array([0, 2, 5]))
    assert np.isnan(scores[1])
    np.testing.assert_allclose(scores[[0, 2]], y[[0, 5]] @ user, rtol=1e-6)


@pytest.mark.parametrize("exact_max_items", [10_000, 10])
def test_search_many_returns_the_top_scoring_factored_items(exact_max_items: int) -> None:
    y = _factors(400, 8, seed=2, zero_rows=tuple(range(0, 400, 10)))
    model = CFModel(y, 0.1, 1.0, 0.0, exact_max_items=exact_max_items, ivf_nprobe=1_000)
    users = [np.random.default_rng(s).normal(size=8).astype(np.float32) for s in range(3)]
    results = model.search_many([users[0], None, users[1], users[2]], 15)
    assert len(results[1][0]) == 0
    for user, (items, scores) in zip(users, [results[0], results[2], results[3]]):
        exact = y @ user
        exact[::10] = -np.inf  # items without a factor are never proposed
        assert items.tolist() == np.argsort(-exact, kind="stable")[:15].tolist()
        np.testing.assert_allclose(scores, exact[items], rtol=1e-5)


def test_search_many_answers_do_not_depend_on_the_batch() -> None:
    model = CFModel(_factors(200, 6, seed=4), 0.1, 1.0, 0.0)
    users = [np.random.default_rng(s).normal(size=6).astype(np.float32) for s in range(5)]
    together = model.search_many(users, 20)
    for user, (items, scores) in zip(users, together):
        ((alone_items, alone_scores),) = model.search_many([user], 20)
        np.testing.assert_array_equal(items, alone_items)
        np.testing.assert_array_equal(scores, alone_scores)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = CFModel(_factors(zero_rows=(1,)), 0.07, 3.0, 2.5, exact_max_items=123, ivf_nprobe=7)
    model.save(tmp_path / "cf.npz")
    back = CFModel.load(tmp_path / "cf.npz")
    np.testing.assert_array_equal(back.item_factors, model.item_factors)
    assert (back.regularization, back.alpha, back.half_life_days) == (0.07, 3.0, 2.5)
    assert (back.exact_max_items, back.ivf_nprobe) == (123, 7)
    np.testing.assert_array_equal(back.active, model.active)


def test_load_refuses_an_unknown_format_version(tmp_path: Path) -> None:
    np.savez(tmp_path / "cf.npz", format_version=np.int64(99), item_factors=_factors())
    with pytest.raises(ValueError, match="collaborative format 99"):
        CFModel.load(tmp_path / "cf.npz")
