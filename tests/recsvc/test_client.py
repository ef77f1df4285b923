"""RecsvcClient helpers and the recsvc-client CLI against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsvc import bundle as bundle_store
from recsvc.client import _attr_pairs, event, filters, main
from recsvc.v1 import recommender_pb2 as pb
from tests.helpers.running_server import RunningServer, copy_root, serve_config


@pytest.fixture(scope="module")
def running(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("client")
    with RunningServer(serve_config(copy_root(bundle_root, work / "bundles"), work)) as server:
        yield server


@pytest.fixture(scope="module")
def item_ids(bundle_root: Path) -> list[str]:
    return [str(i) for i in bundle_store.load(bundle_root, verify=False).catalog.item_ids[:10]]


def _cli(running: RunningServer, capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--target", running.target, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_filters_helper_builds_every_filter_field() -> None:
    msg = filters(
        exclude_items=["a"],
        include={"category": ["x"]},
        exclude={"brand": ["y", "z"]},
        repeat_policy="exclude",
    )
    assert list(msg.exclude_item_ids) == ["a"]
    assert list(msg.include_attributes["category"].values) == ["x"]
    assert list(msg.exclude_attributes["brand"].values) == ["y", "z"]
    assert msg.repeat_policy == pb.REPEAT_POLICY_EXCLUDE


def test_filters_helper_rejects_an_unknown_repeat_policy() -> None:
    with pytest.raises(ValueError, match="repeat_policy"):
        filters(repeat_policy="sometimes")


def test_event_helper_sets_value_only_when_given() -> None:
    assert not event("u", "i", "view").HasField("value")
    assert event("u", "i", "rating", value=4.0).value == 4.0


def test_attribute_pairs_group_values_by_attribute() -> None:
    assert _attr_pairs(["category=a", "category=b", "brand=c"], "--include") == {
        "category": ["a", "b"],
        "brand": ["c"],
    }
    with pytest.raises(ValueError, match="ATTRIBUTE=VALUE"):
        _attr_pairs(["category"], "--include")


def test_cli_recommend_prints_json_with_k_items(running: RunningServer, capsys) -> None:
    code, out, _ = _cli(running, capsys, "recommend", "--user", "cli-user", "--k", "4")
    assert code == 0
    body = json.loads(out)
    assert len(body["items"]) == 4
    assert body["model_version"] == running.server.models.active.version


def test_cli_recommend_passes_session_items_and_filters(running: RunningServer, capsys, item_ids) -> None:
    code, out, _ = _cli(
        running, capsys, "recommend", "--user", "cli-user", "--session-items", item_ids[0], "nope",
        "--exclude-items", item_ids[1], "--k", "5",
    )  # fmt: skip
    body = json.loads(out)
    assert code == 0
    assert body["unknown_item_ids"] == ["nope"]
    assert item_ids[1] not in {it["item_id"] for it in body["items"]}


def test_cli_similar_prints_neighbours(running: RunningServer, capsys, item_ids) -> None:
    code, out, _ = _cli(running, capsys, "similar", "--item", item_ids[2], "--k", "3")
    assert code == 0
    assert len(json.loads(out)["items"]) == 3


def test_cli_events_from_a_jsonl_file_are_accepted(
    running: RunningServer, capsys, item_ids, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    rows = [
        {"user_id": "cli-ev", "item_id": item_ids[3], "event_type": "click"},
        {"user_id": "cli-ev", "item_id": item_ids[4], "event_type": "purchase"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    code, out, _ = _cli(running, capsys, "events", "--file", str(path))
    assert code == 0
    assert json.loads(out) == {"accepted": 2}


def test_cli_single_event_with_an_unknown_item_exits_2_naming_it(running: RunningServer, capsys) -> None:
    code, out, err = _cli(
        running, capsys, "events", "--user", "u", "--item", "no-such-item", "--type", "click"
    )
    assert code == 2
    assert "INVALID_ARGUMENT" in err and "no-such-item" in err
    assert "Traceback" not in err and out == ""


def test_cli_info_and_health(running: RunningServer, capsys) -> None:
    code, out, _ = _cli(running, capsys, "info")
    assert code == 0
    assert json.loads(out)["version"] == running.server.models.active.version
    code, out, _ = _cli(running, capsys, "health")
    assert (code, out.strip()) == (0, "SERVING")


def test_cli_invalid_request_exits_2_with_the_server_message(running: RunningServer, capsys) -> None:
    code, _, err = _cli(running, capsys, "recommend", "--user", "u", "--k", "100000")
    assert code == 2
    assert "num_results" in err


def test_cli_unreachable_server_exits_2(capsys) -> None:
    code = main(["--target", "127.0.0.1:1", "--timeout", "0.5", "health"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("recsvc-client: UNAVAILABLE") or err.startswith("recsvc-client: DEADLINE_EXCEEDED")


def test_cli_unreachable_server_names_the_target_and_how_to_fix_it(capsys) -> None:
    code = main(["--target", "127.0.0.1:1", "--timeout", "0.5", "info"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot reach recsvc-serve at 127.0.0.1:1" in err and "--target" in err


@pytest.mark.parametrize("timeout", ["0", "-1", "soon"])
def test_cli_rejects_a_timeout_that_is_not_positive(timeout: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--timeout", timeout, "health"])
    assert exit_info.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_cli_reload_refuses_a_version_together_with_rollback(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["reload", "--version", "v1", "--rollback"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_events_refuses_a_file_together_with_a_single_event(tmp_path: Path, capsys) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"user_id": "u", "item_id": "i", "event_type": "click"}) + "\n")
    code = main(["--target", "127.0.0.1:1", "events", "--file", str(path), "--user", "u", "--item", "i"])
    assert code == 2
    assert "either --file or --user/--item" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"user_id": "u", "item_id": "i"}', "line 2: missing field(s) event_type"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ("{not json", "line 2: not valid JSON"),
        (
            '{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": "yesterday"}',
            "line 2: timestamp must be epoch seconds (an integer), got 'yesterday'",
        ),
        (
            '{"user_id": "u", "item_id": "i", "event_type": "rating", "value": "five"}',
            "line 2: value must be a number, got 'five'",
        ),
    ],
)
def test_cli_events_file_errors_name_the_line_and_the_problem(
    line: str, message: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "events.jsonl"
    good = json.dumps({"user_id": "u", "item_id": "i", "event_type": "click"})
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    code = main(["--target", "127.0.0.1:1", "events", "--file", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"events.jsonl {message}" in err
    assert "Error(" not in err  # no Python exception reprs


def test_cli_events_file_that_is_not_text_is_named(tmp_path: Path, capsys) -> None:
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1" + bytes(range(128, 256)))
    code = main(["--target", "127.0.0.1:1", "events", "--file", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "events.parquet" in err and "UTF-8" in err


def test_cli_events_empty_file_says_so_without_calling_the_server(tmp_path: Path, capsys) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("\n")
    code = main(["--target", "127.0.0.1:1", "events", "--file", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "events.jsonl has no events" in err


def test_cli_empty_answer_prints_an_empty_items_list(running: RunningServer, capsys) -> None:
    # A filter value no item has: the answer is empty, and the JSON must say so rather than omit it.
    code, out, _ = _cli(
        running, capsys, "recommend", "--user", "u", "--k", "3", "--include", "category=no-such-value"
    )
    body = json.loads(out)
    assert code == 0
    assert body["items"] == [] and body["personalised"] is False


def test_cli_recommend_and_similar_print_the_filter_values_no_item_has(
    running: RunningServer, capsys, item_ids
) -> None:
    code, out, _ = _cli(
        running, capsys, "recommend", "--user", "u", "--k", "3",
        "--include", "category=no-such-value", "--exclude", "category=also-not-there",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["unknown_filter_values"] == ["category=also-not-there", "category=no-such-value"]
    code, out, _ = _cli(running, capsys, "similar", "--item", item_ids[2], "--exclude", "category=typo")
    assert code == 0
    assert json.loads(out)["unknown_filter_values"] == ["category=typo"]


def test_cli_recommend_without_filters_prints_an_empty_unknown_filter_values_list(
    running: RunningServer, capsys
) -> None:
    code, out, _ = _cli(running, capsys, "recommend", "--user", "u", "--k", "2")
    assert code == 0
    assert json.loads(out)["unknown_filter_values"] == []


def test_client_result_carries_unknown_filter_values(running: RunningServer) -> None:
    with running.client() as client:
        resp = client.recommend("u", 2, filters=filters(include={"category": ["jakcets"]}))
    assert list(resp.unknown_filter_values) == ["category=jakcets"]


def test_cli_output_piped_into_head_ends_quietly(running: RunningServer) -> None:
    # `recsvc-client info | head -1`: head closes the pipe early; that is not an error to report.
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        f"{sys.executable} -m recsvc.client --target {running.target} info | head -c 1 >/dev/null; "
        "exit ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        cwd=repo,
        check=False,
    )
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.returncode == 0
