from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from recsvc.config import DataConfig
from training.data import INTERACTION_COLUMNS, DataValidationError, load_dataset, main

NOW = 1_700_000_000  # 2023-11-14, reference clock for the future-timestamp check
REPO = Path(__file__).resolve().parents[2]  # `python -m training...` runs from the repo root
HM = Path("/work/shared/data/hm_fashion_lastweek")


def items_frame(ids: tuple[str, ...] = ("a", "b", "c")) -> pl.DataFrame:
    return pl.DataFrame(
        {"item_id": list(ids), "title": [f"Item {i}" for i in ids], "category": ["x"] * len(ids)}
    )


def interactions_frame(**overrides: list) -> pl.DataFrame:
    data: dict[str, list] = {
        "user_id": ["u1", "u2", "u1"],
        "item_id": ["a", "b", "c"],
        "timestamp": [1_600_000_300, 1_600_000_100, 1_600_000_200],
        "event": ["view", "purchase", "click"],
    }
    data.update(overrides)
    return pl.DataFrame(data)


def write(folder: Path, interactions: pl.DataFrame, items: pl.DataFrame, fmt: str = "parquet") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("interactions", interactions), ("items", items)):
        path = folder / f"{name}.{fmt}"
        frame.write_parquet(path) if fmt == "parquet" else frame.write_csv(path)
    return folder


def load(folder: Path, **config: object):
    return load_dataset(folder, DataConfig(**config), now=NOW)  # type: ignore[arg-type]


def expect_error(folder: Path, *fragments: str, **config: object) -> str:
    with pytest.raises(DataValidationError) as info:
        load(folder, **config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- shape of the result ------------------------------------------------------------------------


def test_interactions_have_canonical_columns_in_order_with_types(tmp_path: Path) -> None:
    ds = load(write(tmp_path, interactions_frame(), items_frame()))
    assert tuple(ds.interactions.columns) == INTERACTION_COLUMNS
    assert ds.interactions.schema == pl.Schema(
        {
            "user_id": pl.String,
            "item_id": pl.String,
            "timestamp": pl.Int64,
            "event": pl.String,
            "value": pl.Float64,
            "weight": pl.Float32,
        }
    )


def test_interactions_are_sorted_by_time_keeping_file_order_for_ties(tmp_path: Path) -> None:
    frame = interactions_frame(
        user_id=["u1", "u2", "u3", "u4"],
        item_id=["a", "b", "c", "a"],
        timestamp=[50, 10, 50, 10],
        event=["view"] * 4,
    )
    ds = load(write(tmp_path, frame, items_frame()))
    assert ds.interactions["user_id"].to_list() == ["u2", "u4", "u1", "u3"]


def test_extra_columns_are_kept_after_the_canonical_ones(tmp_path: Path) -> None:
    frame = interactions_frame(price=[1.5, 2.5, 3.5], source_row=[0, 1, 2])
    ds = load(write(tmp_path, frame, items_frame()))
    assert ds.interactions.columns[len(INTERACTION_COLUMNS) :] == ["price", "source_row"]
    assert ds.interactions.sort("source_row")["price"].to_list() == [1.5, 2.5, 3.5]


def test_csv_ids_keep_leading_zeros_and_price_becomes_float(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": ["0012", "0034"], "title": ["A", "B"], "price": ["9.99", "12"]})
    frame = interactions_frame(
        user_id=["007", "008"], item_id=["0012", "0034"], timestamp=[1, 2], event=["view"] * 2
    )
    ds = load(write(tmp_path, frame, items, fmt="csv"))
    assert ds.interactions["user_id"].to_list() == ["007", "008"]
    assert ds.items["item_id"].to_list() == ["0012", "0034"]
    assert ds.items.schema["price"] == pl.Float64
    assert ds.items["price"].to_list() == [9.99, 12.0]


def test_integer_ids_become_text(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": [10, 20], "title": ["A", "B"]})
    frame = pl.DataFrame(
        {"user_id": [1, 2], "item_id": [10, 20], "timestamp": [5, 6], "event": ["view", "cart"]}
    )
    ds = load(write(tmp_path, frame, items))
    assert ds.interactions["item_id"].to_list() == ["10", "20"]
    assert ds.items["item_id"].dtype == pl.String


def test_weights_come_from_event_weights_and_ratings_scale_by_value(tmp_path: Path) -> None:
    frame = interactions_frame(
        user_id=["u"] * 4,
        item_id=["a", "b", "c", "a"],
        timestamp=[1, 2, 3, 4],
        event=["view", "purchase", "rating", "rating"],
        value=[None, None, 5.0, None],
    )
    ds = load(
        write(tmp_path, frame, items_frame()), event_weights={"view": 1.0, "purchase": 8.0, "rating": 2.0}
    )
    assert ds.interactions["weight"].to_list() == [1.0, 8.0, 10.0, 2.0]


def test_all_null_value_column_is_accepted_as_float(tmp_path: Path) -> None:
    frame = interactions_frame(value=[None, None, None])
    assert frame.schema["value"] == pl.Null
    ds = load(write(tmp_path, frame, items_frame()))
    assert ds.interactions["value"].dtype == pl.Float64
    assert ds.interactions["value"].null_count() == 3


def test_report_counts_rows_users_items_and_time_range(tmp_path: Path) -> None:
    frame = interactions_frame(item_id=["a", "b", "zz"])
    ds = load(write(tmp_path, frame, items_frame()))
    report = ds.report
    assert (report.rows_read, report.rows_kept, report.dropped) == (3, 2, {"unknown_item": 1})
    assert (report.users, report.interacted_items, report.items_read) == (2, 2, 3)
    assert (report.time_min, report.time_max) == (1_600_000_100, 1_600_000_300)
    summary = report.summary()
    assert "rows read 3, kept 2, dropped 1" in summary
    assert "dropped (unknown_item): 1" in summary


# --- files --------------------------------------------------------------------------------------


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "nope", "does not exist")


def test_missing_interactions_file_is_reported(tmp_path: Path) -> None:
    items_frame().write_parquet(tmp_path / "items.parquet")
    expect_error(tmp_path, "no interactions.parquet or interactions.csv")


def test_both_parquet_and_csv_is_ambiguous(tmp_path: Path) -> None:
    write(tmp_path, interactions_frame(), items_frame())
    items_frame().write_csv(tmp_path / "items.csv")
    expect_error(tmp_path, "both items.parquet and items.csv")


def test_empty_csv_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path, interactions_frame(), items_frame(), fmt="csv")
    (tmp_path / "interactions.csv").write_text("")
    expect_error(tmp_path, "interactions.csv", "empty")


def test_header_only_file_is_reported_as_empty(tmp_path: Path) -> None:
    write(tmp_path, interactions_frame().head(0), items_frame())
    expect_error(tmp_path, "interactions.parquet", "no data rows")


def test_malformed_csv_names_the_file(tmp_path: Path) -> None:
    write(tmp_path, interactions_frame(), items_frame(), fmt="csv")
    (tmp_path / "items.csv").write_text('item_id,title\na,"unterminated\nb,B,extra,fields\n')
    expect_error(tmp_path, "items.csv")


# --- columns ------------------------------------------------------------------------------------


def test_missing_columns_are_listed_with_the_columns_found(tmp_path: Path) -> None:
    frame = interactions_frame().drop("event", "timestamp")
    msg = expect_error(write(tmp_path, frame, items_frame()), "interactions.parquet", "timestamp, event")
    assert "found columns: user_id, item_id" in msg


def test_items_without_title_column_are_rejected(tmp_path: Path) -> None:
    expect_error(write(tmp_path, interactions_frame(), items_frame().drop("title")), "items.parquet", "title")


def test_non_numeric_value_names_column_and_rows(tmp_path: Path) -> None:
    frame = interactions_frame(value=["4.5", "great", "3"])
    expect_error(
        write(tmp_path, frame, items_frame(), fmt="csv"), "interactions.csv", "column value", "'great'", "2"
    )


def test_non_numeric_price_is_rejected(tmp_path: Path) -> None:
    items = items_frame().with_columns(price=pl.Series(["1.0", "cheap", "2"]))
    expect_error(write(tmp_path, interactions_frame(), items), "items.parquet", "column price", "'cheap'")


def test_float_ids_are_a_type_error(tmp_path: Path) -> None:
    frame = interactions_frame(user_id=[1.0, 2.0, 3.0])
    expect_error(write(tmp_path, frame, items_frame()), "column user_id", "expected text")


def test_null_user_ids_are_counted_with_row_numbers(tmp_path: Path) -> None:
    frame = interactions_frame(user_id=["u1", None, None])
    expect_error(
        write(tmp_path, frame, items_frame()), "column user_id", "2 empty or missing user_id", "2, 3"
    )


def test_blank_item_ids_in_catalogue_are_rejected(tmp_path: Path) -> None:
    items = items_frame(("a", "  ", "c"))
    expect_error(write(tmp_path, interactions_frame(), items), "items.parquet", "column item_id", "row(s) 2")


def test_empty_titles_are_rejected(tmp_path: Path) -> None:
    items = items_frame().with_columns(title=pl.Series(["A", "", None]))
    expect_error(
        write(tmp_path, interactions_frame(), items), "column title", "2 empty or missing title", "2, 3"
    )


def test_duplicate_items_are_counted_with_examples(tmp_path: Path) -> None:
    items = items_frame(("a", "b", "a", "c", "b", "a"))
    msg = expect_error(
        write(tmp_path, interactions_frame(), items), "items.parquet", "2 duplicated item id(s)"
    )
    assert "'a' x3" in msg and "'b' x2" in msg


def test_unknown_items_are_dropped_by_default(tmp_path: Path) -> None:
    frame = interactions_frame(item_id=["a", "ghost", "ghost"])
    ds = load(write(tmp_path, frame, items_frame()))
    assert ds.interactions["item_id"].to_list() == ["a"]
    assert ds.report.dropped == {"unknown_item": 2}


def test_unknown_items_are_rejected_when_configured(tmp_path: Path) -> None:
    frame = interactions_frame(item_id=["a", "ghost", "ghost"])
    expect_error(
        write(tmp_path, frame, items_frame()),
        "2 row(s)",
        "1 item id(s) not in items.parquet",
        "'ghost'",
        unknown_items="reject",
    )


def test_unknown_event_types_are_listed_with_the_configured_ones(tmp_path: Path) -> None:
    frame = interactions_frame(event=["view", "wishlist", "share"])
    msg = expect_error(write(tmp_path, frame, items_frame()), "column event", "'share', 'wishlist'")
    assert "'view', 'click', 'cart', 'purchase', 'rating'" in msg


def test_interactions_with_only_unknown_items_are_an_error(tmp_path: Path) -> None:
    frame = interactions_frame(item_id=["x", "y", "z"])
    expect_error(write(tmp_path, frame, items_frame()), "no interaction is left", "3 row(s)")


def test_all_null_titles_are_reported_as_missing(tmp_path: Path) -> None:
    items = items_frame().with_columns(title=pl.lit(None))
    expect_error(write(tmp_path, interactions_frame(), items), "column title", "3 empty or missing title")


def test_invalid_unknown_items_option_is_rejected(tmp_path: Path) -> None:
    expect_error(
        write(tmp_path, interactions_frame(), items_frame()), "unknown_items", unknown_items="ignore"
    )


# --- timestamps ---------------------------------------------------------------------------------


def loaded_timestamps(tmp_path: Path, values: list, fmt: str = "parquet") -> list[int]:
    frame = pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(len(values))],
            "item_id": ["a"] * len(values),
            "timestamp": values,
            "event": ["view"] * len(values),
        }
    )
    ds = load(write(tmp_path, frame, items_frame(), fmt=fmt))
    return ds.interactions.sort("user_id")["timestamp"].to_list()


def test_epoch_seconds_are_kept(tmp_path: Path) -> None:
    assert loaded_timestamps(tmp_path, [1_600_000_000, 1_600_000_001]) == [1_600_000_000, 1_600_000_001]


def test_epoch_milliseconds_are_detected_and_floored(tmp_path: Path) -> None:
    assert loaded_timestamps(tmp_path, [1_600_000_000_999, 1_600_000_001_000]) == [
        1_600_000_000,
        1_600_000_001,
    ]


def test_float_epoch_seconds_are_floored(tmp_path: Path) -> None:
    assert loaded_timestamps(tmp_path, [1_600_000_000.7, 1_600_000_001.2]) == [1_600_000_000, 1_600_000_001]


def test_iso_strings_of_mixed_forms_become_utc_seconds(tmp_path: Path) -> None:
    values = ["2020-09-16", "2020-09-16T10:00:00Z", "2020-09-16 12:00:00+02:00", "2020-09-16T10:00:00.5"]
    expected = int(datetime(2020, 9, 16, tzinfo=timezone.utc).timestamp())
    assert loaded_timestamps(tmp_path, values) == [
        expected,
        expected + 36_000,
        expected + 36_000,
        expected + 36_000,
    ]


@pytest.mark.parametrize(
    "values",
    [
        ["2020-09-16T10:00:00Z", "2020-09-17T11:30:00Z"],
        ["2020-09-16 12:00:00+02:00", "2020-09-16 13:30:00-05:00"],
        ["2020-09-16T10:00:00.5", "2020-09-16T10:00:01.75"],
        ["2020-09-16 10:00", "2020-09-16 11:00"],
    ],
)
def test_uniform_iso_columns_match_the_standard_library(tmp_path: Path, values: list[str]) -> None:
    parsed = [datetime.fromisoformat(v) for v in values]
    expected = [int((p if p.tzinfo else p.replace(tzinfo=timezone.utc)).timestamp() // 1) for p in parsed]
    assert loaded_timestamps(tmp_path, values) == expected


def test_day_first_dates_are_rejected_not_guessed(tmp_path: Path) -> None:
    frame = interactions_frame(timestamp=["09/10/2020", "10/10/2020", "11/10/2020"])
    expect_error(
        write(tmp_path, frame, items_frame()), "column timestamp", "neither epoch numbers nor ISO-8601"
    )


def test_numeric_csv_timestamps_are_epoch_not_text(tmp_path: Path) -> None:
    assert loaded_timestamps(tmp_path, [1_600_000_000_000, 1_600_000_060_000], fmt="csv") == [
        1_600_000_000,
        1_600_000_060,
    ]


def test_date_and_timezone_datetime_columns_are_converted(tmp_path: Path) -> None:
    midnight = int(datetime(2020, 9, 16, tzinfo=timezone.utc).timestamp())
    assert loaded_timestamps(tmp_path / "d", [date(2020, 9, 16)]) == [midnight]
    moment = pl.Series([datetime(2020, 9, 16, 2, 0)]).dt.replace_time_zone("Europe/Paris")  # 00:00 UTC
    assert loaded_timestamps(tmp_path / "t", moment.to_list()) == [midnight]


def test_unparseable_timestamps_are_reported_with_examples(tmp_path: Path) -> None:
    frame = interactions_frame(timestamp=["2020-09-16", "yesterday", "16/09/2020"])
    expect_error(
        write(tmp_path, frame, items_frame()), "column timestamp", "2 value(s)", "'yesterday'", "rows 2, 3"
    )


def test_mixed_seconds_and_milliseconds_are_rejected(tmp_path: Path) -> None:
    frame = interactions_frame(timestamp=[1_600_000_000, 1_600_000_000_000, 1_600_000_001_000])
    expect_error(write(tmp_path, frame, items_frame()), "mixes units", "1 look like epoch seconds", "rows 1")


def test_negative_timestamps_are_rejected(tmp_path: Path) -> None:
    frame = interactions_frame(timestamp=[5, -1, 7])
    expect_error(write(tmp_path, frame, items_frame()), "1 negative value(s)", "row(s) 2")


def test_future_timestamps_beyond_tolerance_are_rejected(tmp_path: Path) -> None:
    frame = interactions_frame(timestamp=[NOW, NOW + 3_600, NOW + 2 * 86_400])
    msg = expect_error(write(tmp_path, frame, items_frame()), "1 value(s) in the future", "row(s) 3")
    assert "2023-11-16" in msg


def test_missing_timestamps_are_rejected(tmp_path: Path) -> None:
    frame = interactions_frame(timestamp=[1, None, 3])
    expect_error(write(tmp_path, frame, items_frame()), "column timestamp", "1 missing timestamp", "row(s) 2")


def test_boolean_timestamps_are_a_type_error(tmp_path: Path) -> None:
    frame = interactions_frame(timestamp=[True, False, True])
    expect_error(write(tmp_path, frame, items_frame()), "column timestamp has type Boolean")


# --- command line ---


def test_cli_prints_the_report_for_a_valid_folder(synth_dataset: Path, capsys) -> None:
    assert main([str(synth_dataset)]) == 0
    assert "rows read 6,000, kept 6,000" in capsys.readouterr().out


def test_cli_reports_bad_data_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    write(tmp_path, interactions_frame(item_id=["a", "b", "ghost"]), items_frame())
    proc = subprocess.run(
        [sys.executable, "-m", "training.data", str(tmp_path), "--reject-unknown-items"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "'ghost'" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- shared data --------------------------------------------------------------------------------


def test_synthetic_fixture_loads_without_drops(synth_loaded) -> None:
    assert synth_loaded.report.dropped == {}
    assert synth_loaded.interactions.height == 6_000
    assert set(synth_loaded.interactions["event"].unique()) == {"view", "click", "cart", "purchase"}


@pytest.mark.skipif(not HM.is_dir(), reason="H&M data not staged on this machine")
def test_hm_week_loads_completely() -> None:
    ds = load_dataset(HM)
    assert ds.interactions.height == 240_311
    assert ds.items.height == 105_542
    assert ds.report.users == 68_984
    assert ds.interactions["timestamp"].is_sorted()
    assert {"price", "source_row"} <= set(ds.interactions.columns)
