from __future__ import annotations

import polars as pl
import pytest

from recsvc.config import DAY
from training.split import data_end, holdout_cutoff, time_split, timestamp_step, validation_cutoffs

MIDNIGHT = 1_600_214_400  # 2020-09-16 00:00 UTC


def frame(timestamps: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(len(timestamps))],
            "item_id": ["a"] * len(timestamps),
            "timestamp": pl.Series(timestamps, dtype=pl.Int64),
        }
    )


def daily() -> pl.DataFrame:
    """Seven dates of midnight timestamps, like the H&M week."""
    return frame([MIDNIGHT + d * DAY for d in range(7) for _ in range(3)])


def test_daily_data_is_detected_as_day_resolution() -> None:
    assert timestamp_step(daily()) == DAY
    assert timestamp_step(frame([MIDNIGHT, MIDNIGHT + 5])) == 1


def test_holding_out_one_day_of_daily_data_gives_exactly_the_last_date() -> None:
    data = daily()
    split = time_split(data, holdout_cutoff(data, 1))
    assert split.test["timestamp"].unique().to_list() == [MIDNIGHT + 6 * DAY]
    assert split.train["timestamp"].max() == MIDNIGHT + 5 * DAY


def test_holding_out_two_days_of_daily_data_gives_the_last_two_dates() -> None:
    data = daily()
    assert holdout_cutoff(data, 2) == MIDNIGHT + 5 * DAY


def test_continuous_data_holds_out_events_after_end_minus_days() -> None:
    last = MIDNIGHT + 10 * DAY + 123
    data = frame([MIDNIGHT + 7, last - DAY, last - DAY + 1, last])
    cutoff = holdout_cutoff(data, 1)
    assert cutoff == last - DAY + 1
    split = time_split(data, cutoff)
    assert split.test["timestamp"].to_list() == [last - DAY + 1, last]


def test_split_puts_cutoff_itself_in_test_and_keeps_row_order() -> None:
    data = frame([30, 10, 20, 40, 20])
    split = time_split(data, 20)
    assert split.train["timestamp"].to_list() == [10]
    assert split.test["timestamp"].to_list() == [30, 20, 40, 20]
    assert split.cutoff == 20
    assert split.train.height + split.test.height == data.height


def test_data_end_is_exclusive_end_of_the_last_period() -> None:
    assert data_end(daily()) == MIDNIGHT + 7 * DAY
    assert data_end(frame([100, 250])) == 251


def test_validation_cutoffs_step_back_by_whole_windows() -> None:
    t = MIDNIGHT + 6 * DAY
    assert validation_cutoffs(t, 1) == (t - DAY, t - 2 * DAY)
    assert validation_cutoffs(t, 0.5) == (t - DAY // 2, t - DAY)


def test_validation_windows_on_daily_data_are_whole_dates() -> None:
    data = daily()
    t = holdout_cutoff(data, 1)
    t1, t2 = validation_cutoffs(t, 1)
    assert time_split(data, t1).test.filter(pl.col("timestamp") < t)["timestamp"].unique().to_list() == [
        MIDNIGHT + 5 * DAY
    ]
    assert t2 == MIDNIGHT + 4 * DAY


def test_synthetic_fixture_splits_into_non_empty_windows(synth_loaded) -> None:
    interactions = synth_loaded.interactions
    t = holdout_cutoff(interactions, 1)
    t1, t2 = validation_cutoffs(t, 1)
    ts = interactions["timestamp"]
    assert ((ts >= t1) & (ts < t)).sum() > 0
    assert ((ts >= t2) & (ts < t1)).sum() > 0
    assert (ts < t2).sum() > 0


def test_holding_out_everything_is_an_error() -> None:
    with pytest.raises(ValueError, match="leaves no training data"):
        holdout_cutoff(daily(), 7)


def test_non_positive_days_are_an_error() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        holdout_cutoff(daily(), 0)
    with pytest.raises(ValueError, match="must be positive"):
        validation_cutoffs(MIDNIGHT, -1)


def test_empty_interactions_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="empty"):
        holdout_cutoff(frame([]), 1)
