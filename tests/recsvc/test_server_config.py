"""recsvc-serve configuration: file < RECSVC_* environment < flags, and CLI errors exit 2."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from recsvc.server import ConfigError, load_config, main, run_event_loop, set_switch_interval


def test_defaults_apply_without_file_or_environment() -> None:
    cfg = load_config(None, env={})
    assert (cfg.port, cfg.max_k, cfg.workers) == (50051, 200, 4)


def test_yaml_file_then_environment_then_overrides_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  port: 6000\n  max_k: 50\n  workers: 3\n", encoding="utf-8")
    cfg = load_config(
        path, env={"RECSVC_MAX_K": "70", "RECSVC_WORKERS": "5"}, overrides={"workers": 8, "host": None}
    )
    assert cfg.port == 6000
    assert cfg.max_k == 70
    assert cfg.workers == 8
    assert cfg.host == "127.0.0.1"


def test_json_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"max_in_flight": 9}), encoding="utf-8")
    assert load_config(path, env={}).max_in_flight == 9


def test_environment_values_are_parsed_by_field_type() -> None:
    cfg = load_config(
        None,
        env={
            "RECSVC_RELOAD_POLL_S": "0.5",
            "RECSVC_KEEP_PREVIOUS_BUNDLE": "false",
            "RECSVC_MAX_PER_CATEGORY": "3",
            "RECSVC_EXPERIMENTS": "exp.yaml",
        },
    )
    assert cfg.reload_poll_s == 0.5
    assert cfg.keep_previous_bundle is False
    assert cfg.max_per_category == 3
    assert cfg.experiments == "exp.yaml"


def test_optional_field_can_be_unset_from_the_environment() -> None:
    assert load_config(None, env={"RECSVC_MAX_PER_CATEGORY": "none"}).max_per_category is None


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="RECSVC_PORT"):
        load_config(None, env={"RECSVC_PORT": "fifty"})


def test_unknown_file_option_is_named(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("max_kk: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max_kk"):
        load_config(path, env={})


def test_out_of_range_value_is_named() -> None:
    with pytest.raises(ConfigError, match="max_in_flight"):
        load_config(None, env={"RECSVC_MAX_IN_FLIGHT": "0"})


def test_zero_batch_dispatchers_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="batch_dispatchers"):
        load_config(None, env={"RECSVC_BATCH_DISPATCHERS": "0"})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml", env={})


def test_cli_exits_2_with_a_message_for_a_missing_bundles_dir(tmp_path: Path, capsys) -> None:
    code = main(["--bundles", str(tmp_path / "absent"), "--port", "0", "--metrics-port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "absent" in err and "Traceback" not in err


def test_cli_help_explains_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--bundles",
        "--port",
        "--config",
        "--metrics-port",
        "--events-db",
        "--experiments",
        "--workers",
        "--processes",
    ):
        assert flag in out


def test_negative_switch_interval_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="switch_interval_ms"):
        load_config(None, env={"RECSVC_SWITCH_INTERVAL_MS": "-1"})


def test_switch_interval_is_set_in_milliseconds_and_zero_leaves_it() -> None:
    before = sys.getswitchinterval()
    try:
        set_switch_interval(2.0)
        assert sys.getswitchinterval() == pytest.approx(0.002)
        set_switch_interval(0.0)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


def test_negative_batch_linger_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="batch_linger_ms"):
        load_config(None, env={"RECSVC_BATCH_LINGER_MS": "-0.5"})


def test_processes_defaults_to_one_and_auto_means_zero_from_env_and_file(tmp_path: Path) -> None:
    assert load_config(None, env={}).processes == 1
    assert load_config(None, env={"RECSVC_PROCESSES": "auto"}).processes == 0
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  processes: auto\n", encoding="utf-8")
    assert load_config(path, env={}).processes == 0
    assert load_config(None, env={"RECSVC_PROCESSES": "3"}).processes == 3


def test_negative_processes_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"ServeConfig\.processes"):
        load_config(None, env={"RECSVC_PROCESSES": "-1"})


def test_cli_processes_flag_rejects_words_other_than_auto(tmp_path: Path, capsys) -> None:
    (tmp_path / "bundles").mkdir()
    code = main(["--bundles", str(tmp_path / "bundles"), "--processes", "many", "--metrics-port", "0"])
    assert code == 2
    assert "--processes must be an integer or 'auto'" in capsys.readouterr().err


def test_processes_zero_resolves_to_the_usable_cores() -> None:
    from recsvc.compute_threads import usable_cores
    from recsvc.server_processes import resolve_processes

    assert resolve_processes(0) == usable_cores() >= 1
    assert resolve_processes(3) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "-1"], "--port must be 0..65535, got -1"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--processes", "-2"], "--processes must be >= 0"),
    ],
)
def test_cli_out_of_range_flag_is_named_as_the_flag_the_user_typed(
    argv: list[str], message: str, tmp_path: Path, capsys
) -> None:
    (tmp_path / "bundles").mkdir()
    code = main(["--bundles", str(tmp_path / "bundles"), "--metrics-port", "0", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "ServeConfig." not in err


def test_out_of_range_value_from_the_environment_still_names_the_field_when_flags_are_given() -> None:
    with pytest.raises(ConfigError, match=r"ServeConfig\.port must be 0\.\.65535"):
        load_config(None, env={"RECSVC_PORT": "70000"}, overrides={"port": None}, flags={"port": "--port"})


def test_cli_help_says_where_the_exposure_log_is_written(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exposures.sqlite" in out and "RECSVC_EXPOSURES_DB" in out


def test_out_of_range_metrics_port_is_refused_naming_the_flag(tmp_path: Path, capsys) -> None:
    (tmp_path / "bundles").mkdir()
    assert main(["--bundles", str(tmp_path / "bundles"), "--metrics-port", "-1"]) == 2
    assert "--metrics-port must be 0..65535 (0 = off), got -1" in capsys.readouterr().err


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_event_loop_defaults_to_uvloop_and_asyncio_can_be_chosen() -> None:
    assert load_config(None, env={}).event_loop == "uvloop"
    assert run_event_loop(_loop_module(), "uvloop").startswith("uvloop")
    assert run_event_loop(_loop_module(), "asyncio").startswith("asyncio")


def test_unknown_event_loop_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"ServeConfig\.event_loop must be one of uvloop, asyncio"):
        load_config(None, env={"RECSVC_EVENT_LOOP": "trio"})
