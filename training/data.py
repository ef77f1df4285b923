"""Load and validate a canonical data folder into typed polars tables.

Everything downstream (splits, fine-tuning, features, serving state) trusts these tables, so every
data problem is caught here and reported in words a user can act on: which file, which column,
how many rows and which ones (row numbers count data rows from 1, header excluded).

`python -m training.data FOLDER` validates a folder and prints the report (exit 2 on bad data).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl

from recsvc.config import DataConfig

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "event", "value", "weight")
REQUIRED_INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "event")
REQUIRED_ITEM_COLUMNS = ("item_id", "title")
SUPPORTED_FORMATS = ("parquet", "csv")
MAX_EXAMPLES = 5

# Epoch values at or above these magnitudes are read as finer units (a 2020 date is ~1.6e9 s).
_UNIT_THRESHOLDS = (
    (1e17, "nanoseconds", 1_000_000_000),
    (1e14, "microseconds", 1_000_000),
    (1e11, "milliseconds", 1_000),
)
_ISO_PREFIX = r"^\s*\d{4}-\d{2}-\d{2}"
_SECONDS_FLOOR = 1e8  # values between this and 1e11 are plainly seconds (1973..5138)


class DataValidationError(ValueError):
    """A problem in the input data, with a message meant for the person who supplied it."""


@dataclass
class ValidationReport:
    """What loading found and did; logged, and kept on the Dataset for the training manifest."""

    interactions_file: str
    items_file: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    items_read: int = 0
    users: int = 0
    interacted_items: int = 0
    time_min: int | None = None
    time_max: int | None = None
    timestamp_format: str = ""
    event_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable multi-line digest of the load."""
        lines = [
            f"interactions: {self.interactions_file}",
            f"  rows read {self.rows_read:,}, kept {self.rows_kept:,}, dropped {sum(self.dropped.values()):,}",
        ]
        lines += [f"    dropped ({reason}): {count:,}" for reason, count in sorted(self.dropped.items())]
        lines.append(f"  users {self.users:,}, items with interactions {self.interacted_items:,}")
        if self.time_min is not None and self.time_max is not None:
            lines.append(
                f"  time range {_iso(self.time_min)} .. {_iso(self.time_max)} "
                f"({(self.time_max - self.time_min) / 86_400:.2f} days; timestamps read as {self.timestamp_format})"
            )
        if self.event_counts:
            events = ", ".join(f"{e}={n:,}" for e, n in sorted(self.event_counts.items()))
            lines.append(f"  events: {events}")
        lines.append(f"items: {self.items_file}")
        lines.append(f"  catalogue items {self.items_read:,}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class Dataset:
    """Validated interactions (sorted by time) and item catalogue."""

    interactions: pl.DataFrame
    items: pl.DataFrame
    report: ValidationReport


def load_dataset(folder: str | Path, config: DataConfig = DataConfig(), *, now: int | None = None) -> Dataset:  # noqa: B008 (frozen)
    """Read `interactions.{parquet,csv}` and `items.{parquet,csv}` from `folder` and validate them.

    `now` (epoch seconds) is the reference for rejecting future timestamps; None means the wall clock.
    Raises DataValidationError for any problem in the data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataValidationError(f"data folder {folder} does not exist or is not a directory")
    if config.unknown_items not in ("drop", "reject"):
        raise DataValidationError(
            f"DataConfig.unknown_items must be 'drop' or 'reject', got {config.unknown_items!r}"
        )
    started = time.perf_counter()
    interactions_path = find_table(folder, "interactions")
    items_path = find_table(folder, "items")
    report = ValidationReport(interactions_file=str(interactions_path), items_file=str(items_path))

    items = validate_items(read_table(items_path, string_columns=None), items_path.name)
    report.items_read = items.height

    raw = read_table(interactions_path, string_columns=REQUIRED_INTERACTION_COLUMNS)
    report.rows_read = raw.height
    now_s = int(time.time()) if now is None else int(now)
    interactions, ts_format = validate_interactions(raw, interactions_path.name, config, now_s, report)
    report.timestamp_format = ts_format
    interactions = _apply_catalogue(
        interactions, items, interactions_path.name, items_path.name, config, report
    )

    interactions = interactions.sort("timestamp", maintain_order=True)
    report.rows_kept = interactions.height
    report.users = interactions["user_id"].n_unique()
    report.interacted_items = interactions["item_id"].n_unique()
    if interactions.height:
        report.time_min = int(interactions["timestamp"].min())  # type: ignore[arg-type]
        report.time_max = int(interactions["timestamp"].max())  # type: ignore[arg-type]
    counts = interactions.group_by("event").len()
    report.event_counts = dict(zip(counts["event"].to_list(), counts["len"].to_list()))
    log.info("loaded %s in %.2fs\n%s", folder, time.perf_counter() - started, report.summary())
    return Dataset(interactions=interactions, items=items, report=report)


# ---------------------------------------------------------------------------------------------
# Files


def find_table(folder: Path, stem: str) -> Path:
    """The single `<stem>.parquet` or `<stem>.csv` in folder; ambiguity or absence is an error."""
    found = [folder / f"{stem}.{fmt}" for fmt in SUPPORTED_FORMATS if (folder / f"{stem}.{fmt}").is_file()]
    if not found:
        raise DataValidationError(f"{folder}: no {stem}.parquet or {stem}.csv found")
    if len(found) > 1:
        raise DataValidationError(
            f"{folder}: both {stem}.parquet and {stem}.csv exist; keep only one so it is clear which to use"
        )
    return found[0]


def read_table(path: Path, string_columns: tuple[str, ...] | None) -> pl.DataFrame:
    """Read a parquet or CSV file; CSV columns are typed here so ids never lose leading zeros.

    `string_columns` are read as text from CSV; None reads every CSV column as text (catalogue
    attributes), otherwise other CSV columns are numbers when every value parses as one.
    """
    try:
        if path.suffix == ".parquet":
            df = pl.read_parquet(path)
        else:
            if path.stat().st_size == 0:
                raise DataValidationError(f"{path.name}: file is empty")
            df = pl.read_csv(path, infer_schema=False)
            if string_columns is not None:
                df = df.with_columns(
                    _numeric_if_possible(df[c]) for c in df.columns if c not in string_columns
                )
    except DataValidationError:
        raise
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataValidationError(f"{path.name}: cannot be read ({first})") from exc
    if df.height == 0:
        raise DataValidationError(f"{path.name}: file is empty (no data rows)")
    return df


def _numeric_if_possible(col: pl.Series) -> pl.Series:
    """Int64 or Float64 when every non-null text value parses as that, else the text unchanged."""
    non_null = col.null_count()
    for dtype in (pl.Int64, pl.Float64):
        cast = col.cast(dtype, strict=False)
        if cast.null_count() == non_null:
            return cast
    return col


# ---------------------------------------------------------------------------------------------
# Items


def validate_items(items: pl.DataFrame, file_name: str) -> pl.DataFrame:
    """Check the catalogue: required columns, non-empty unique ids, non-empty titles, numeric price."""
    _require_columns(items, REQUIRED_ITEM_COLUMNS, file_name)
    items = items.with_columns(
        _as_text(items["item_id"], file_name),
        _as_text(items["title"], file_name),
    )
    _reject_blank(items["item_id"], file_name, "empty or missing item_id")
    _reject_blank(items["title"], file_name, "empty or missing title")
    dup = items.group_by("item_id", maintain_order=True).len().filter(pl.col("len") > 1)
    if dup.height:
        examples = ", ".join(f"{i!r} x{n}" for i, n in dup.head(MAX_EXAMPLES).iter_rows())
        raise DataValidationError(
            f"{file_name}: column item_id has {dup.height:,} duplicated item id(s) "
            f"({int(dup['len'].sum()):,} rows), e.g. {examples}; each item must appear once"
        )
    if "price" in items.columns:
        items = items.with_columns(_as_float(items["price"], file_name))
    return items


# ---------------------------------------------------------------------------------------------
# Interactions


def validate_interactions(
    df: pl.DataFrame, file_name: str, config: DataConfig, now: int, report: ValidationReport
) -> tuple[pl.DataFrame, str]:
    """Type, check and weight the interaction rows; returns the canonical frame and timestamp format."""
    _require_columns(df, REQUIRED_INTERACTION_COLUMNS, file_name)
    user_id = _as_text(df["user_id"], file_name)
    item_id = _as_text(df["item_id"], file_name)
    event = _as_text(df["event"], file_name)
    _reject_blank(user_id, file_name, "empty or missing user_id")
    _reject_blank(item_id, file_name, "empty or missing item_id")
    _reject_blank(event, file_name, "empty or missing event")
    unknown_events = sorted(set(event.unique().to_list()) - set(config.event_weights))
    if unknown_events:
        n_rows = int(event.is_in(unknown_events).sum())
        raise DataValidationError(
            f"{file_name}: column event has {n_rows:,} row(s) with unknown event type(s) "
            f"{', '.join(map(repr, unknown_events[:10]))}; configured event types are "
            f"{', '.join(map(repr, config.event_weights))} (DataConfig.event_weights)"
        )
    timestamp, ts_format = normalise_timestamps(df["timestamp"], file_name)
    _check_time_range(timestamp, file_name, now, config.future_tolerance_s)
    if "value" in df.columns:
        value = _as_float(df["value"], file_name)
    else:
        value = pl.Series("value", [None] * df.height, dtype=pl.Float64)
    if "weight" in df.columns:
        report.notes.append(
            f"{file_name}: input column 'weight' replaced by weights from DataConfig.event_weights"
        )
    out = pl.DataFrame([user_id, item_id, timestamp, event, value]).with_columns(
        event_weight(pl.col("event"), pl.col("value"), config).alias("weight")
    )
    extras = [c for c in df.columns if c not in INTERACTION_COLUMNS]
    return pl.concat([out, df.select(extras)], how="horizontal") if extras else out, ts_format


def event_weight(event: pl.Expr, value: pl.Expr, config: DataConfig) -> pl.Expr:
    """Weight = configured event weight, times the rating value for 'rating' events that carry one."""
    base = event.replace_strict(config.event_weights, return_dtype=pl.Float64)
    scaled = pl.when((event == "rating") & value.is_not_null()).then(base * value).otherwise(base)
    return scaled.cast(pl.Float32)


def normalise_timestamps(col: pl.Series, file_name: str) -> tuple[pl.Series, str]:
    """Epoch seconds/ms/us/ns (by magnitude), ISO-8601 text, dates or datetimes -> Int64 epoch seconds UTC."""
    _reject_nulls(col, file_name, "missing timestamp")
    dtype = col.dtype
    if dtype == pl.Date:
        return col.cast(pl.Datetime("ms")).dt.epoch("s").alias("timestamp"), "dates"
    if isinstance(dtype, pl.Datetime):
        fmt = "datetimes" if dtype.time_zone is None else f"datetimes ({dtype.time_zone})"
        return col.dt.epoch("s").alias("timestamp"), fmt
    if dtype == pl.String:
        numeric = _numeric_if_possible(col)
        if numeric.dtype == pl.String:
            return _parse_iso(col, file_name), "ISO-8601 text"
        col = numeric
    if not col.dtype.is_numeric() or col.dtype == pl.Boolean:
        raise DataValidationError(
            f"{file_name}: column timestamp has type {col.dtype}; expected epoch seconds or milliseconds, "
            "ISO-8601 text, or dates"
        )
    if col.dtype.is_float() and not col.is_finite().all():
        rows = _row_numbers(~col.is_finite())
        raise DataValidationError(f"{file_name}: column timestamp has non-finite values at row(s) {rows}")
    return _epoch_to_seconds(col, file_name)


def _epoch_to_seconds(col: pl.Series, file_name: str) -> tuple[pl.Series, str]:
    """Pick the epoch unit from the largest magnitude, refusing columns that mix units."""
    largest = float(col.abs().max())  # type: ignore[arg-type]
    unit, divisor = "seconds", 1
    for threshold, name, div in _UNIT_THRESHOLDS:
        if largest >= threshold:
            unit, divisor = name, div
            break
    if divisor > 1:
        looks_like_seconds = (col.abs() >= _SECONDS_FLOOR) & (col.abs() < 1e11)
        if looks_like_seconds.any():
            raise DataValidationError(
                f"{file_name}: column timestamp mixes units: most values look like epoch {unit} but "
                f"{int(looks_like_seconds.sum()):,} look like epoch seconds (rows {_row_numbers(looks_like_seconds)})"
            )
    seconds = (
        (col.cast(pl.Float64) / divisor).floor() if col.dtype.is_float() else col.cast(pl.Int64) // divisor
    )
    return seconds.cast(pl.Int64).alias("timestamp"), f"epoch {unit}"


def _parse_iso(col: pl.Series, file_name: str) -> pl.Series:
    """ISO-8601 dates or datetimes (offset-aware or naive = UTC) to epoch seconds.

    A column in one consistent year-first layout is parsed by polars (fast); otherwise each distinct
    value goes through the standard library, which accepts every ISO form (dates, 'T' or space
    separator, fractions, 'Z' or +hh:mm offsets) mixed within one column. Day-first or US dates are
    never guessed: they are reported as errors.
    """
    if bool(col.str.contains(_ISO_PREFIX).all()):
        try:
            fast = col.str.strip_chars().str.to_datetime(time_unit="us", strict=True)
        except pl.exceptions.PolarsError:
            fast = None
        if fast is not None and fast.null_count() == 0:
            return fast.dt.epoch("s").alias("timestamp")
    distinct = col.unique()
    parsed: list[int | None] = []
    bad: list[str] = []
    for text in distinct.to_list():
        seconds = _iso_to_epoch(text)
        if seconds is None:
            bad.append(text)
        parsed.append(seconds)
    if bad:
        mask = col.is_in(bad)
        raise DataValidationError(
            f"{file_name}: column timestamp has {int(mask.sum()):,} value(s) that are neither epoch numbers nor "
            f"ISO-8601 dates/datetimes, e.g. {', '.join(map(repr, bad[:MAX_EXAMPLES]))} (rows {_row_numbers(mask)})"
        )
    mapping = dict(zip(distinct.to_list(), parsed))
    return col.replace_strict(mapping, return_dtype=pl.Int64).alias("timestamp")


def _iso_to_epoch(text: str) -> int | None:
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            moment_date = date.fromisoformat(text)
        except ValueError:
            return None
        moment = datetime(moment_date.year, moment_date.month, moment_date.day)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() // 1)


def _check_time_range(ts: pl.Series, file_name: str, now: int, tolerance_s: int) -> None:
    negative = ts < 0
    if negative.any():
        raise DataValidationError(
            f"{file_name}: column timestamp has {int(negative.sum()):,} negative value(s) (before 1970) "
            f"at row(s) {_row_numbers(negative)}"
        )
    future = ts > now + tolerance_s
    if future.any():
        raise DataValidationError(
            f"{file_name}: column timestamp has {int(future.sum()):,} value(s) in the future (latest "
            f"{_iso(int(ts.max()))}, now is {_iso(now)}) at row(s) {_row_numbers(future)}"  # type: ignore[arg-type]
        )


def _apply_catalogue(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    file_name: str,
    items_file: str,
    config: DataConfig,
    report: ValidationReport,
) -> pl.DataFrame:
    """Drop (and count) or reject interactions whose item is not in the catalogue."""
    known = interactions["item_id"].is_in(items["item_id"].implode())
    n_unknown = interactions.height - int(known.sum())
    if not n_unknown:
        return interactions
    unknown = interactions.filter(~known)["item_id"].unique(maintain_order=True)
    detail = (
        f"{n_unknown:,} row(s) of {file_name} refer to {unknown.len():,} item id(s) not in {items_file}, "
        f"e.g. {', '.join(map(repr, unknown.head(MAX_EXAMPLES).to_list()))} (rows {_row_numbers(~known)})"
    )
    if config.unknown_items == "reject":
        raise DataValidationError(f"{file_name}: column item_id: {detail}")
    if n_unknown == interactions.height:
        raise DataValidationError(f"{file_name}: column item_id: no interaction is left, all {detail}")
    log.warning("dropping interactions with unknown items: %s", detail)
    report.dropped["unknown_item"] = n_unknown
    report.notes.append(f"dropped rows with unknown items: {detail}")
    return interactions.filter(known)


# ---------------------------------------------------------------------------------------------
# Column helpers


def _require_columns(df: pl.DataFrame, required: tuple[str, ...], file_name: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{file_name}: missing required column(s) {', '.join(missing)}; found columns: {', '.join(df.columns)}"
        )


def _as_text(col: pl.Series, file_name: str) -> pl.Series:
    """Ids and labels as Utf8; integer ids are accepted and written in decimal."""
    if col.dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(col.dtype, pl.Enum):
        return col.cast(pl.String)
    if col.dtype.is_integer():
        return col.cast(pl.String)
    raise DataValidationError(
        f"{file_name}: column {col.name} has type {col.dtype}; expected text (or integer ids)"
    )


def _as_float(col: pl.Series, file_name: str) -> pl.Series:
    """A numeric column as Float64; text that is not a number is an error naming the rows."""
    if col.dtype.is_numeric() and col.dtype != pl.Boolean:
        return col.cast(pl.Float64)
    if col.dtype == pl.Null:
        return col.cast(pl.Float64)
    if col.dtype == pl.String:
        cast = col.cast(pl.Float64, strict=False)
        bad = cast.is_null() & col.is_not_null() & (col.str.strip_chars() != "")
        if not bad.any():
            return cast
        examples = ", ".join(map(repr, col.filter(bad).head(MAX_EXAMPLES).to_list()))
        raise DataValidationError(
            f"{file_name}: column {col.name} must be numeric but has {int(bad.sum()):,} non-numeric value(s), "
            f"e.g. {examples} (rows {_row_numbers(bad)})"
        )
    raise DataValidationError(f"{file_name}: column {col.name} has type {col.dtype}; expected a number")


def _reject_blank(col: pl.Series, file_name: str, what: str) -> None:
    blank = col.is_null() | (col.str.strip_chars() == "")
    if blank.any():
        raise DataValidationError(
            f"{file_name}: column {col.name} has {int(blank.sum()):,} {what} value(s) at row(s) {_row_numbers(blank)}"
        )


def _reject_nulls(col: pl.Series, file_name: str, what: str) -> None:
    if col.null_count():
        raise DataValidationError(
            f"{file_name}: column {col.name} has {col.null_count():,} {what} value(s) at row(s) "
            f"{_row_numbers(col.is_null())}"
        )


def _row_numbers(mask: pl.Series) -> str:
    """First few 1-based data-row numbers where mask holds (CSV line = row + 1 for the header)."""
    rows = (mask.fill_null(True).arg_true() + 1).head(MAX_EXAMPLES).to_list()
    more = int(mask.fill_null(True).sum()) - len(rows)
    return ", ".join(map(str, rows)) + (f" and {more:,} more" if more > 0 else "")


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    """`python -m training.data FOLDER`: validate a canonical folder and print what was found."""
    parser = argparse.ArgumentParser(
        prog="python -m training.data",
        description="Validate a canonical data folder (interactions + items) and print the load report.",
    )
    parser.add_argument(
        "folder", type=Path, help="folder with interactions.{parquet,csv} and items.{parquet,csv}"
    )
    parser.add_argument(
        "--reject-unknown-items",
        action="store_true",
        help="fail when an interaction's item is not in the catalogue (default: drop and count such rows)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    config = DataConfig(unknown_items="reject" if args.reject_unknown_items else "drop")
    try:
        dataset = load_dataset(args.folder, config)
    except DataValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(dataset.report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
