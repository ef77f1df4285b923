from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsvc import ab_stats
from recsvc.ab_report import ABReportError, build_report, main, read_events
from recsvc.config import ExperimentsConfig
from recsvc.events import EventStore
from recsvc.exposures import Exposure, ExposureLog, exposures_frame, pseudonymise, shown_items
from recsvc.history import Event

KEY = "test-key"


def _split_log(n: int = 100, clicks: dict[str, int] | None = None) -> tuple[list[Exposure], list[dict]]:
    """n exposures per variant; the first clicks[variant] of them get a click (+ a purchase worth 2.0)."""
    clicks = clicks or {"control": 10, "treatment": 30}
    exposures, events = [], []
    for variant, n_clicked in clicks.items():
        for i in range(n):
            rid = f"{variant}-{i}"
            user = f"{variant}-user-{i}"
            exposures.append(
                Exposure(
                    rid,
                    pseudonymise(user, KEY),
                    "exp",
                    variant,
                    shown_items(["a", "b", "c"], variant),
                    "m1",
                    100,
                )
            )
            if i < n_clicked:
                events.append(
                    {
                        "request_id": rid,
                        "user_id": user,
                        "item_id": "b",
                        "event": "click",
                        "timestamp": 110,
                        "value": None,
                    }
                )
                events.append(
                    {
                        "request_id": rid,
                        "user_id": user,
                        "item_id": "b",
                        "event": "purchase",
                        "timestamp": 120,
                        "value": 2.0,
                    }
                )
    return exposures, events


def _events_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "request_id": pl.Utf8,
            "user_id": pl.Utf8,
            "item_id": pl.Utf8,
            "event": pl.Utf8,
            "timestamp": pl.Int64,
            "value": pl.Float64,
        },
    )


def test_report_ctr_and_test_match_the_hand_counts() -> None:
    exposures, events = _split_log()
    report = build_report(exposures_frame(exposures), _events_frame(events))
    (exp,) = report.experiments
    by_name = {v.variant: v for v in exp.variants}
    assert exp.control == "control"
    assert by_name["control"].ctr.rate == pytest.approx(0.10)
    assert by_name["treatment"].ctr.rate == pytest.approx(0.30)
    assert by_name["treatment"].ctr_test == ab_stats.two_proportion_ztest(10, 100, 30, 100)
    assert by_name["treatment"].ctr_test.p_value < 0.001
    assert by_name["control"].ctr_test is None
    assert by_name["treatment"].revenue[0] == pytest.approx(30 * 2.0 / 100)
    assert by_name["treatment"].revenue_test.diff == pytest.approx(0.6 - 0.2)


def test_equal_variants_are_not_significant() -> None:
    exposures, events = _split_log(clicks={"control": 20, "treatment": 20})
    report = build_report(exposures_frame(exposures), _events_frame(events))
    treatment = next(v for v in report.experiments[0].variants if v.variant == "treatment")
    assert treatment.ctr_test.p_value == 1.0


def test_revenue_is_omitted_when_events_carry_no_value() -> None:
    exposures, events = _split_log()
    rows = [dict(e, value=None) for e in events]
    report = build_report(exposures_frame(exposures), _events_frame(rows))
    assert all(v.revenue is None for v in report.experiments[0].variants)


def test_interleaved_exposures_are_scored_by_team_credit_not_split() -> None:
    exposures, events = [], []
    for i in range(20):
        rid = f"il-{i}"
        items = [("a", 1, "ann"), ("b", 2, "ranker"), ("c", 3, "ann"), ("d", 4, "ranker")]
        exposures.append(Exposure(rid, f"k{i}", "il", "ann", items, "m1", 100))
        clicked = "b" if i < 15 else "a"  # ranker's item clicked in 15 impressions, ann's in 5
        events.append(
            {
                "request_id": rid,
                "user_id": None,
                "item_id": clicked,
                "event": "click",
                "timestamp": 101,
                "value": None,
            }
        )
    report = build_report(exposures_frame(exposures), _events_frame(events))
    (exp,) = report.experiments
    assert exp.variants == []
    (il,) = exp.interleaving
    assert (il.team_a, il.team_b, il.impressions) == ("ann", "ranker", 20)
    assert (il.test.wins_a, il.test.wins_b, il.test.ties) == (5, 15, 0)
    assert il.test.p_value == pytest.approx(ab_stats.sign_test(5, 15).p_value)


def test_cli_reads_sqlite_logs_and_writes_markdown_html_and_plot(tmp_path: Path, capsys) -> None:
    exposures, events = _split_log()
    with ExposureLog(tmp_path / "exposures.sqlite") as exposure_log:
        exposure_log.append_many(exposures)
    store = EventStore(tmp_path / "events.sqlite")
    # no request ids: the report must match events to exposures by pseudonymised user + item + time
    store.append([Event(e["user_id"], e["item_id"], e["event"], e["timestamp"], e["value"]) for e in events])
    store.close()
    args = [
        "report",
        "--exposures",
        str(tmp_path / "exposures.sqlite"),
        "--events",
        str(tmp_path / "events.sqlite"),
    ]
    args += ["--pseudonym-key", KEY, "--plot", str(tmp_path / "r.png")]
    assert main([*args, "--out", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out
    assert "treatment" in out and "30.00%" in out
    assert "80 of 80 events attributed" in out
    assert "| exp | treatment |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<table>" in page and "src='r.png'" in page


def test_cli_reads_parquet_exposures_and_csv_events(tmp_path: Path, capsys) -> None:
    exposures, events = _split_log()
    exposures_frame(exposures).write_parquet(tmp_path / "e.parquet")
    _events_frame(events).write_csv(tmp_path / "ev.csv")
    assert (
        main(["report", "--exposures", str(tmp_path / "e.parquet"), "--events", str(tmp_path / "ev.csv")])
        == 0
    )
    assert "30.00%" in capsys.readouterr().out


def test_cli_missing_file_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    rc = main(["report", "--exposures", str(tmp_path / "nope.sqlite"), "--events", str(tmp_path / "x.csv")])
    assert rc == 2
    assert "nope.sqlite" in capsys.readouterr().err


def test_events_without_required_column_are_rejected_naming_it(tmp_path: Path) -> None:
    pl.DataFrame({"item_id": ["a"], "event": ["click"]}).write_parquet(tmp_path / "ev.parquet")
    with pytest.raises(ABReportError, match=r"ev\.parquet lacks column\(s\): timestamp"):
        read_events(tmp_path / "ev.parquet", KEY)


def test_control_falls_back_to_first_variant_by_name() -> None:
    exposures, events = _split_log(clicks={"a-arm": 5, "b-arm": 9})
    report = build_report(exposures_frame(exposures), _events_frame(events), ExperimentsConfig())
    assert report.experiments[0].control == "a-arm"


def _write_logs(tmp_path: Path) -> list[str]:
    exposures, events = _split_log()
    exposures_frame(exposures).write_parquet(tmp_path / "e.parquet")
    _events_frame(events).write_csv(tmp_path / "ev.csv")
    return ["report", "--exposures", str(tmp_path / "e.parquet"), "--events", str(tmp_path / "ev.csv")]


def test_an_explicit_control_that_is_not_a_variant_is_an_error_naming_the_variants() -> None:
    exposures, events = _split_log()
    with pytest.raises(ABReportError, match=r"--control 'contrl'.*exp.*control, treatment"):
        build_report(exposures_frame(exposures), _events_frame(events), ExperimentsConfig(), control="contrl")


def test_cli_unknown_control_exits_2(tmp_path: Path, capsys) -> None:
    assert main([*_write_logs(tmp_path), "--control", "nope"]) == 2
    assert "--control 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window-s", "-5"], "--window-s must be >= 0"),
        (["--click-events", ""], "--click-events needs at least one event type"),
        (["--conversion-events", " , "], "--conversion-events needs at least one event type"),
        (["--plot", "chart.txt"], "--plot chart.txt: expected a .png, .svg or .pdf file name"),
    ],
)
def test_cli_bad_options_exit_2_naming_the_flag(
    tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    assert main([*_write_logs(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_output_in_a_missing_folder_exits_2_before_writing_anything(tmp_path: Path, capsys) -> None:
    args = [*_write_logs(tmp_path), "--plot", str(tmp_path / "r.png"), "--out", str(tmp_path / "no" / "r.md")]
    assert main(args) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()  # no half set of outputs


def test_event_types_absent_from_the_events_are_warned_about(tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="recsvc.ab_report"):
        assert main([*_write_logs(tmp_path), "--click-events", "clik"]) == 0
    assert any("'clik'" in r.getMessage() and "--click-events" in r.getMessage() for r in caplog.records)


def test_rate_differences_are_printed_in_percentage_points_not_percent(tmp_path: Path, capsys) -> None:
    # control 10% vs treatment 30% CTR: the difference is +20 points (a relative +200%), never "+20.00%".
    assert main(_write_logs(tmp_path)) == 0
    treatment = next(line for line in capsys.readouterr().out.splitlines() if "treatment" in line)
    assert "+20.00 pp [" in treatment
    assert "+20.00%" not in treatment
