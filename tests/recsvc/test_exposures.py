from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from recsvc.exposures import (
    EXPOSURE_SCHEMA,
    Exposure,
    ExposureLog,
    ExposureLogError,
    attribute,
    exposures_frame,
    pseudonymise,
    shown_items,
)


def _exposure(rid: str, user: str = "u1", variant: str = "control", ts: int = 1000, items=None) -> Exposure:
    items = items if items is not None else shown_items(["x", "y", "z"], variant)
    return Exposure(rid, pseudonymise(user, "k"), "exp", variant, items, "v1", ts)


def test_append_is_readable_by_a_fresh_connection_at_once(tmp_path: Path) -> None:
    db = tmp_path / "exp.sqlite"
    log = ExposureLog(db)
    log.append(_exposure("r1"))
    # a second, independent connection sees the committed row: append committed before returning
    rows = sqlite3.connect(db).execute("SELECT request_id, variant FROM exposures").fetchall()
    assert rows == [("r1", "control")]
    log.close()


def test_exposures_survive_a_process_that_exits_without_closing(tmp_path: Path) -> None:
    db = tmp_path / "exp.sqlite"
    code = (
        "import os\n"
        "from recsvc.exposures import Exposure, ExposureLog\n"
        f"log = ExposureLog({str(db)!r})\n"
        "log.append(Exposure('r9', 'uk', 'e', 'v', [('a', 1, 'v')], 'm', 5))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert [e.request_id for e in ExposureLog(db).read()] == ["r9"]


def test_read_round_trips_every_field(tmp_path: Path) -> None:
    log = ExposureLog(tmp_path / "e.sqlite")
    e = _exposure("r1", items=[("x", 1, "a"), ("y", 2, "b")])
    log.append(e)
    assert log.read() == [e]
    assert log.read("other-experiment") == []


def test_duplicate_request_id_is_rejected_and_names_it(tmp_path: Path) -> None:
    log = ExposureLog(tmp_path / "e.sqlite")
    log.append(_exposure("r1"))
    with pytest.raises(ExposureLogError, match="request_id"):
        log.append(_exposure("r1"))
    assert log.count() == 1


def test_append_many_is_all_or_nothing(tmp_path: Path) -> None:
    log = ExposureLog(tmp_path / "e.sqlite")
    log.append(_exposure("r1"))
    with pytest.raises(ExposureLogError):
        log.append_many([_exposure("r2"), _exposure("r1")])
    assert log.count() == 1


def test_unopenable_path_raises_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExposureLogError, match="file"):
        ExposureLog(blocker / "sub" / "e.sqlite")


def test_pseudonymise_is_stable_per_key_and_differs_across_keys() -> None:
    assert pseudonymise("alice", "k1") == pseudonymise("alice", "k1")
    assert pseudonymise("alice", "k1") != pseudonymise("alice", "k2")
    assert pseudonymise("alice", "k1") != pseudonymise("bob", "k1")
    assert "alice" not in pseudonymise("alice", "k1")


def test_pseudonymise_rejects_empty_key() -> None:
    with pytest.raises(ValueError, match="key"):
        pseudonymise("alice", "")


def test_export_parquet_has_one_row_per_shown_item(tmp_path: Path) -> None:
    log = ExposureLog(tmp_path / "e.sqlite")
    log.append(_exposure("r1"))
    log.append(_exposure("r2", items=[]))
    n = log.export_parquet(tmp_path / "e.parquet")
    frame = pl.read_parquet(tmp_path / "e.parquet")
    assert n == frame.height == 4
    assert dict(frame.schema) == EXPOSURE_SCHEMA
    assert frame.filter(pl.col("request_id") == "r1")["position"].to_list() == [1, 2, 3]
    assert frame.filter(pl.col("request_id") == "r2")["item_id"].to_list() == [None]


def test_shown_items_rejects_origin_count_mismatch() -> None:
    with pytest.raises(ValueError, match="one origin per item"):
        shown_items(["a", "b"], ["x"])


def _events(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "user_key": pl.Utf8,
            "item_id": pl.Utf8,
            "event": pl.Utf8,
            "timestamp": pl.Int64,
            "value": pl.Float64,
            "request_id": pl.Utf8,
        },
    )


def test_attribute_uses_request_id_and_drops_items_that_were_not_shown() -> None:
    exp = exposures_frame([_exposure("r1"), _exposure("r2", variant="treatment")])
    ev = _events(
        [
            {
                "user_key": None,
                "item_id": "y",
                "event": "click",
                "timestamp": 5,
                "value": None,
                "request_id": "r2",
            },
            {
                "user_key": None,
                "item_id": "q",
                "event": "click",
                "timestamp": 5,
                "value": None,
                "request_id": "r1",
            },
        ]
    )
    out = attribute(exp, ev)
    assert out.select("request_id", "variant", "item_id", "position").rows() == [("r2", "treatment", "y", 2)]


def test_attribute_falls_back_to_latest_exposure_of_the_user_within_the_window() -> None:
    exp = exposures_frame(
        [
            _exposure("early", ts=1000),
            _exposure("late", ts=2000, variant="treatment"),
            _exposure("other-user", user="u2", ts=2500),
        ]
    )
    uk = pseudonymise("u1", "k")
    ev = _events(
        [
            {
                "user_key": uk,
                "item_id": "x",
                "event": "click",
                "timestamp": 2100,
                "value": None,
                "request_id": None,
            },
            {
                "user_key": uk,
                "item_id": "x",
                "event": "click",
                "timestamp": 1500,
                "value": None,
                "request_id": None,
            },
            {
                "user_key": uk,
                "item_id": "x",
                "event": "buy",
                "timestamp": 9000,
                "value": 3.0,
                "request_id": None,
            },
            {
                "user_key": uk,
                "item_id": "x",
                "event": "click",
                "timestamp": 900,
                "value": None,
                "request_id": None,
            },
        ]
    )
    out = attribute(exp, ev, window_s=1000)
    # 2100 -> latest earlier exposure "late"; 1500 -> "early"; 9000 is outside the window; 900 precedes all
    assert out.select("request_id", "timestamp").rows() == [("late", 2100), ("early", 1500)]


def test_attribute_names_missing_event_columns() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        attribute(exposures_frame([_exposure("r1")]), pl.DataFrame({"item_id": ["x"], "event": ["click"]}))
