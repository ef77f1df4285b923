from __future__ import annotations

import numpy as np
import pytest

from recsvc.cold_slots import cold_slot_count, with_cold_slots
from recsvc.final_order import final_rows
from recsvc.retrieval import best_first


def _ref_capped(order: np.ndarray, items: np.ndarray, codes: np.ndarray, cap: int, k: int) -> np.ndarray:
    """The greedy diversity cap as Recommender._diversify defined it before the kernel."""
    taken: dict[int, int] = {}
    chosen = []
    for i in order:
        code = int(codes[items[i]])
        if code >= 0 and taken.get(code, 0) >= cap:
            continue
        taken[code] = taken.get(code, 0) + 1
        chosen.append(i)
        if len(chosen) == k:
            break
    return np.asarray(chosen, dtype=np.int64)


def _ref_rows(
    scores: np.ndarray,
    items: np.ndarray,
    cold: np.ndarray,
    k: int,
    share: float,
    first: int,
    codes: np.ndarray,
    cap: int,
) -> np.ndarray:
    order = with_cold_slots(best_first(scores, items), cold, k, share, first)
    return _ref_capped(order, items, codes, cap, k) if cap > 0 else order[:k]


def _random_block(rng: np.random.Generator, n_requests: int, n_items: int) -> tuple[list, list, list]:
    scores, items, cold = [], [], []
    for r in range(n_requests):
        m = int(rng.integers(0, 80))
        s = rng.standard_normal(m)
        if r % 3 == 0:
            s = np.round(s, 1)  # many ties: they must go by item
        if r % 7 == 6 and m:
            s[rng.integers(0, m, 3)] = np.nan
        c = np.where(rng.random(m) < 0.3, rng.standard_normal(m).astype(np.float32), np.nan)
        if r % 4 == 1:
            c = np.round(c, 1)
        scores.append(s)
        items.append(rng.choice(n_items, m, replace=False).astype(np.int32))
        cold.append(c.astype(np.float32))
    return scores, items, cold


@pytest.mark.parametrize("cap", [0, 1, 3])
@pytest.mark.parametrize(("share", "first"), [(0.0, 0), (0.2, 0), (0.25, 3), (0.5, 1)])
def test_final_rows_equal_best_first_then_cold_slots_then_the_diversity_cap(
    cap: int, share: float, first: int
) -> None:
    rng = np.random.default_rng(cap * 100 + int(share * 10) + first)
    n_items, n_values = 500, 9
    codes = rng.integers(-1, n_values, n_items).astype(np.int32)
    scores, items, cold = _random_block(rng, 60, n_items)
    ks = rng.choice([1, 5, 12, 40, 100], len(scores)).astype(np.int64)
    slots = np.array([cold_slot_count(int(k), share, first) for k in ks], dtype=np.int64)
    bounds = np.cumsum([0] + [len(s) for s in scores]).astype(np.int64)
    taken = np.zeros(n_values, np.int64)
    rows, out_bounds = final_rows(
        np.concatenate(scores),
        np.concatenate(items),
        np.concatenate(cold),
        bounds,
        ks,
        slots,
        first,
        codes if cap else np.zeros(0, np.int32),
        cap,
        taken,
    )
    assert (taken == 0).all()
    for r in range(len(scores)):
        expected = _ref_rows(scores[r], items[r], cold[r], int(ks[r]), share, first, codes, cap)
        np.testing.assert_array_equal(
            rows[out_bounds[r] : out_bounds[r + 1]], expected, err_msg=f"request {r}"
        )
