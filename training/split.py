"""Time-based splits: what is "the future" for evaluation and for each training stage.

Splitting by time (never at random) is what keeps offline metrics honest: every model and feature
sees only data before a cutoff and is judged on what happened after it. The windows follow the
"Time windows" section of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import polars as pl

from recsvc.config import DAY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """train = rows with timestamp < cutoff; test = rows with timestamp >= cutoff."""

    train: pl.DataFrame
    test: pl.DataFrame
    cutoff: int


def timestamp_step(interactions: pl.DataFrame) -> int:
    """Resolution of the timestamps: a day when every timestamp is midnight UTC (daily logs), else 1 s."""
    ts = _timestamps(interactions)
    return DAY if bool(((ts % DAY) == 0).all()) else 1


def data_end(interactions: pl.DataFrame) -> int:
    """Exclusive end of the data: the moment just after the last event.

    For daily logs the last date covers a whole day, so the end is that midnight + 1 day. This is
    `T` for training without a test period.
    """
    ts = _timestamps(interactions)
    return int(ts.max()) + timestamp_step(interactions)  # type: ignore[arg-type]


def holdout_cutoff(interactions: pl.DataFrame, days: float) -> int:
    """First timestamp of the held-out period: the last `days` days before the end of the data.

    With daily timestamps (H&M), holding out 1 day gives exactly the last date.
    """
    if not days > 0:
        raise ValueError(f"days to hold out must be positive, got {days!r}")
    cutoff = data_end(interactions) - round(days * DAY)
    first = int(_timestamps(interactions).min())  # type: ignore[arg-type]
    if cutoff <= first:
        raise ValueError(
            f"holding out {days:g} day(s) leaves no training data: the data spans only "
            f"{(data_end(interactions) - first) / DAY:.2f} day(s)"
        )
    return cutoff


def time_split(interactions: pl.DataFrame, cutoff: int) -> Split:
    """Rows before `cutoff` train, rows at or after it test; row order is preserved in both."""
    ts = pl.col("timestamp")
    train = interactions.filter(ts < cutoff)
    test = interactions.filter(ts >= cutoff)
    if train.height == 0 or test.height == 0:
        log.warning("time split at %d has %d train and %d test rows", cutoff, train.height, test.height)
    else:
        log.info("time split at %d: %d train rows, %d test rows", cutoff, train.height, test.height)
    return Split(train=train, test=test, cutoff=int(cutoff))


def validation_cutoffs(train_end_cutoff: int, days: float) -> tuple[int, int]:
    """(T1, T2) with T1 = T - days and T2 = T1 - days, for the ranker's training and validation windows.

    Encoder fine-tuning uses data < T2; ranker labels come from [T2, T1) with features < T2;
    validation labels from [T1, T) with features < T1.
    """
    if not days > 0:
        raise ValueError(f"validation days must be positive, got {days!r}")
    step = round(days * DAY)
    t1 = int(train_end_cutoff) - step
    return t1, t1 - step


def _timestamps(interactions: pl.DataFrame) -> pl.Series:
    if "timestamp" not in interactions.columns:
        raise ValueError(
            f"interactions have no timestamp column (columns: {', '.join(interactions.columns)})"
        )
    if interactions.height == 0:
        raise ValueError("interactions are empty: there is no time range to split")
    return interactions["timestamp"]
