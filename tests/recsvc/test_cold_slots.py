from __future__ import annotations

import numpy as np

from recsvc.cold_slots import cold_slot_count, slot_positions, with_cold_slots

NAN = np.nan


def test_slot_count_rounds_the_share_up_and_needs_room_after_the_first_position() -> None:
    assert cold_slot_count(200, 0.05, 12) == 10
    assert cold_slot_count(20, 0.01, 12) == 1
    assert cold_slot_count(12, 0.5, 12) == 0
    assert cold_slot_count(14, 0.5, 12) == 2  # never more slots than positions after the first
    assert cold_slot_count(200, 0.0, 0) == 0


def test_slot_positions_are_spread_over_the_tail_starting_at_the_first_position() -> None:
    assert slot_positions(20, 4, 12).tolist() == [12, 14, 16, 18]
    assert slot_positions(10, 1, 0).tolist() == [0]


def test_best_cold_rows_take_the_slots_and_the_rest_keep_their_order() -> None:
    order = np.arange(10)
    cold = np.full(10, NAN)
    cold[[7, 8, 9]] = [0.1, 0.9, 0.5]  # ranked last by the ranker
    out = with_cold_slots(order, cold, k=6, share=0.34, first_position=2)  # 3 slots: 2, 3, 4
    assert out[:6].tolist() == [0, 1, 8, 9, 7, 2]
    assert sorted(out.tolist()) == list(range(10))
    rest = [r for r in out.tolist() if r not in (7, 8, 9)]
    assert rest == list(range(7))


def test_cold_rows_the_ranker_already_placed_count_towards_the_quota() -> None:
    order = np.array([4, 0, 1, 2, 3, 5, 6])
    cold = np.full(7, NAN)
    cold[[4, 6]] = [0.2, 0.3]
    out = with_cold_slots(order, cold, k=4, share=0.25, first_position=1)  # 1 slot, already filled
    np.testing.assert_array_equal(out, order)
    two = with_cold_slots(order, cold, k=4, share=0.5, first_position=1)  # 2 slots: one more needed
    assert two[:4].tolist() == [4, 0, 6, 1]  # slots 1 and 2: the one still needed is the last


def test_without_cold_candidates_or_slots_the_order_is_unchanged() -> None:
    order = np.array([3, 1, 2, 0])
    np.testing.assert_array_equal(with_cold_slots(order, np.full(4, NAN), 3, 0.5, 0), order)
    cold = np.array([NAN, NAN, NAN, 1.0])
    np.testing.assert_array_equal(with_cold_slots(order, cold, 3, 0.0, 0), order)


def test_a_list_no_longer_than_k_is_left_as_it_is() -> None:
    order = np.arange(4)
    cold = np.array([NAN, NAN, NAN, 0.4])
    out = with_cold_slots(order, cold, k=10, share=0.1, first_position=8)
    assert out.tolist() == [0, 1, 2, 3]


def test_moving_a_cold_row_in_never_pushes_an_already_placed_cold_row_out() -> None:
    cold = np.array([NAN, NAN, 0.5, 0.4])
    out = with_cold_slots(np.arange(4), cold, k=3, share=0.67, first_position=1)  # 2 slots, 1 filled
    assert out.tolist() == [0, 2, 3, 1]  # both cold rows in the top 3, warm row 1 moved out
