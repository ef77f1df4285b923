from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsvc.user_tower import (
    TowerParams,
    TowerParamsError,
    UserTower,
    load_params,
    save_params,
    user_vector,
    user_vectors,
)

DIM, LEN = 8, 5


def random_tower(seed: int = 0) -> UserTower:
    torch.manual_seed(seed)
    tower = UserTower(DIM, LEN)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return tower


def random_batch(seed: int = 1, batch: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hist = rng.normal(size=(batch, LEN, DIM)).astype(np.float32)
    hist /= np.linalg.norm(hist, axis=2, keepdims=True)
    ages = rng.uniform(0, 30 * 86_400, size=(batch, LEN)).astype(np.float32)
    weights = rng.choice([1.0, 2.0, 8.0], size=(batch, LEN)).astype(np.float32)
    lengths = np.array([5, 1, 3, 0, 2, 5])[:batch]
    mask = np.arange(LEN)[None, :] < lengths[:, None]
    return hist, ages, weights, mask


def torch_vectors(tower: UserTower, hist, ages, weights, mask) -> np.ndarray:
    with torch.no_grad():
        out = tower(
            torch.from_numpy(hist), torch.from_numpy(ages), torch.from_numpy(weights), torch.from_numpy(mask)
        )
    return out.numpy()


def test_numpy_tower_matches_torch_module_with_padding() -> None:
    tower = random_tower()
    hist, ages, weights, mask = random_batch()
    expected = torch_vectors(tower, hist, ages, weights, mask)
    got = user_vectors(tower.to_params(), hist, ages, weights, mask)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_single_user_vector_equals_the_batched_row() -> None:
    params = random_tower().to_params()
    hist, ages, weights, mask = random_batch()
    batched = user_vectors(params, hist, ages, weights, mask)
    row = 2
    n = int(mask[row].sum())
    np.testing.assert_allclose(
        user_vector(params, hist[row, :n], ages[row, :n], weights[row, :n]), batched[row], atol=1e-6
    )


def test_user_vectors_are_unit_length_and_empty_rows_are_zero() -> None:
    hist, ages, weights, mask = random_batch()
    out = user_vectors(random_tower().to_params(), hist, ages, weights, mask)
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[mask.any(axis=1)], 1.0, atol=1e-5)
    assert norms[~mask.any(axis=1)].tolist() == [0.0]


def test_empty_history_returns_none() -> None:
    params = random_tower().to_params()
    assert user_vector(params, np.zeros((0, DIM), np.float32), np.zeros(0), np.zeros(0)) is None


def test_untrained_tower_is_the_normalised_mean_of_the_history() -> None:
    params = UserTower(DIM, LEN).to_params()
    hist, ages, weights, _ = random_batch()
    mean = hist[0].mean(axis=0)
    np.testing.assert_allclose(
        user_vector(params, hist[0], ages[0], weights[0]), mean / np.linalg.norm(mean), atol=1e-6
    )


def test_recency_pooling_tower_is_the_weight_and_recency_weighted_mean() -> None:
    params = UserTower.recency_pooling(DIM, LEN, half_life_days=3.0).to_params()
    hist, ages, weights, _ = random_batch()
    coef = weights[0] * np.exp2(-ages[0] / (3.0 * 86_400))
    pooled = (coef[:, None] * hist[0]).sum(axis=0)
    np.testing.assert_allclose(
        user_vector(params, hist[0], ages[0], weights[0]), pooled / np.linalg.norm(pooled), atol=1e-5
    )


def test_recency_pooling_torch_and_numpy_agree() -> None:
    tower = UserTower.recency_pooling(DIM, LEN, half_life_days=1.0)
    hist, ages, weights, mask = random_batch()
    expected = torch_vectors(tower, hist, ages, weights, mask)
    np.testing.assert_allclose(
        user_vectors(tower.to_params(), hist, ages, weights, mask), expected, atol=1e-5
    )


def test_recency_pooling_rejects_a_non_positive_half_life() -> None:
    with pytest.raises(ValueError, match="half_life_days"):
        UserTower.recency_pooling(DIM, LEN, half_life_days=0.0)


def test_tower_file_without_age_days_coef_loads_it_as_zero(tmp_path: Path) -> None:
    """Bundles written before the linear age term still load and serve the same vectors."""
    params = random_tower().to_params()
    path = tmp_path / "old.npz"
    old_keys = ("query", "age_coef", "weight_coef", "position_bias", "linear", "bias")
    np.savez(path, **{k: getattr(params, k) for k in old_keys})
    loaded = load_params(path)
    assert float(loaded.age_days_coef) == 0.0
    np.testing.assert_array_equal(loaded.linear, params.linear)


def test_history_longer_than_history_len_uses_the_most_recent_items() -> None:
    params = random_tower().to_params()
    hist, ages, weights, _ = random_batch()
    longer = np.concatenate([hist[0], hist[1]])  # 10 items, only the first 5 count
    got = user_vector(
        params, longer, np.concatenate([ages[0], ages[1]]), np.concatenate([weights[0], weights[1]])
    )
    np.testing.assert_allclose(got, user_vector(params, hist[0], ages[0], weights[0]), atol=1e-6)


def test_recent_heavy_age_coefficient_favours_recent_items() -> None:
    params = UserTower(DIM, LEN).to_params()
    strong = TowerParams(**{**params.__dict__, "age_coef": np.float32(-20.0)})
    hist = np.eye(DIM, dtype=np.float32)[:2]
    out = user_vector(strong, hist, np.array([0.0, 30 * 86_400.0]), np.ones(2))
    assert out[0] > 0.99 and out[1] < 0.01


def test_params_round_trip_through_npz(tmp_path: Path) -> None:
    params = random_tower().to_params()
    loaded = load_params(save_params(params, tmp_path / "user_tower.npz"))
    for key in ("query", "age_coef", "weight_coef", "position_bias", "linear", "bias", "age_days_coef"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(params, key))
    assert UserTower.from_params(loaded).history_len == LEN


def test_load_params_names_the_file_and_missing_arrays(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, query=np.zeros(DIM, np.float32))
    with pytest.raises(TowerParamsError, match=r"bad\.npz.*linear"):
        load_params(path)


def test_load_params_of_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(TowerParamsError, match=r"nope\.npz"):
        load_params(tmp_path / "nope.npz")
