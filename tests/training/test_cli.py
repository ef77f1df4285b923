from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recsvc import bundle
from training import cli

REPO = Path(__file__).resolve().parents[2]


def _publish(root: Path, payload: bytes) -> str:
    staging = bundle.new_staging_dir(root)
    (staging / "catalog.parquet").write_bytes(payload)
    return bundle.publish(staging, root, {})


def test_help_documents_every_training_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--out",
        "--config",
        "--model-dir",
        "--epochs",
        "--max-steps",
        "--no-eval",
        "--stage",
        "--work-dir",
        "--seed",
        "--device",
        "--verbose",
        "rollback",
        "verify",
    ):
        assert flag in text


def test_python_dash_m_training_prints_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert "recsvc-train" in out.stdout


def test_missing_data_folder_exits_2_with_a_message_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "bundles")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nope" in err and "does not exist" in err
    assert "Traceback" not in err


def test_data_folder_without_interactions_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    code = cli.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "bundles"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "interactions" in err
    assert not bundle.list_versions(tmp_path / "bundles")


def test_unknown_config_option_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("encoder:\n  epochz: 3\n")
    code = cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "b"), "--config", str(config)])
    assert code == 2
    assert "epochz" in capsys.readouterr().err


def test_config_file_and_flags_override_defaults_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text('{"encoder": {"epochs": 3, "lr": 0.001}, "ranker": {"num_leaves": 7}}')
    args = cli.train_parser().parse_args(
        ["--data", "d", "--out", "o", "--config", str(config), "--epochs", "5", "--seed", "9"]
    )
    cfg = cli.build_config(args)
    assert (cfg.encoder.epochs, cfg.encoder.lr, cfg.ranker.num_leaves) == (5, 0.001, 7)
    assert cfg.encoder.seed == 9 and cfg.ranker.seed == 9


def test_stage_without_work_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "b"), "--stage", "ranker"])
    assert code == 2
    assert "--work-dir" in capsys.readouterr().err


def test_rollback_switches_current_and_reports_both_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _publish(tmp_path, b"old")
    new = _publish(tmp_path, b"new")
    assert cli.main(["rollback", "--bundles", str(tmp_path)]) == 0
    assert f"{new} -> {old}" in capsys.readouterr().out
    assert bundle.current_version(tmp_path) == old
    assert cli.main(["rollback", "--bundles", str(tmp_path), "--to", new]) == 0
    assert bundle.current_version(tmp_path) == new


def test_verify_reports_ok_then_exit_2_on_corruption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = _publish(tmp_path, b"data")
    assert cli.main(["verify", "--bundles", str(tmp_path)]) == 0
    assert f"ok: bundle {version}" in capsys.readouterr().out
    (tmp_path / version / "catalog.parquet").write_bytes(b"tampered")
    assert cli.main(["verify", "--bundles", str(tmp_path / version)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch in catalog.parquet" in err and "Traceback" not in err


def test_list_marks_the_current_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _publish(tmp_path, b"old")
    new = _publish(tmp_path, b"new")
    assert cli.main(["list", "--bundles", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"  {old}", f"* {new}"]


def test_rollback_without_bundles_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rollback", "--bundles", str(tmp_path)]) == 2
    assert "no CURRENT" in capsys.readouterr().err


def test_model_dir_that_is_not_a_checkpoint_exits_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "not_bert").mkdir()
    code = cli.main(
        ["--data", str(tmp_path), "--out", str(tmp_path / "b"), "--model-dir", str(tmp_path / "not_bert")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "not_bert" in err and "config.json" in err
    assert not (tmp_path / "b").exists()


def test_too_short_data_exits_2_explaining_the_time_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.synth import write_dataset

    data = write_dataset(tmp_path / "data", n_users=20, n_items=10, n_interactions=200, days=2, seed=1)
    code = cli.main(["--data", str(data), "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "valid_days" in err and "Traceback" not in err


def test_out_of_range_config_value_exits_2_naming_field_and_file_before_reading_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("ranker:\n  train_label_windows: 0\n")
    # The data folder does not exist: had the run started, the error would be about it.
    code = cli.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b"), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "ranker.train_label_windows must be >= 1, got 0" in err
    assert str(config) in err
    assert "does not exist" not in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_config_from_file_names_the_file_and_the_out_of_range_field(tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text('{"index": {"ivf_nprobe": 0}}')
    with pytest.raises(cli.ConfigFileError, match=r"cfg\.json: index\.ivf_nprobe must be >= 1, got 0"):
        cli.config_from_file(config)


def test_out_of_range_flag_value_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b"), "--seed", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "encoder.seed must be in [0, 2147483647], got -1" in err and "Traceback" not in err


def test_config_model_dir_that_is_not_a_checkpoint_exits_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "not_bert").mkdir()
    config = tmp_path / "cfg.yaml"
    config.write_text(f"encoder:\n  model_dir: {tmp_path / 'not_bert'}\n")
    code = cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "b"), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "encoder.model_dir" in err and "config.json" in err
    assert not (tmp_path / "b").exists()


def test_the_demo_training_command_builds_a_config_that_passes_the_check() -> None:
    # training/demo.py runs `recsvc-train --data D --out B --max-steps 150` (its default).
    args = cli.train_parser().parse_args(["--data", "d", "--out", "o", "--max-steps", "150"])
    assert cli.build_config(args).encoder.max_steps == 150


def test_config_file_eval_k_is_used_as_eval_ks(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("eval_k: [5, 10]\n")
    assert cli.config_from_file(path).eval.ks == (5, 10)


def test_config_file_with_eval_k_and_a_different_eval_ks_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("eval_k: [5, 10]\neval:\n  ks: [12]\n")
    with pytest.raises(cli.ConfigFileError, match=r"eval_k \[5, 10\] and eval.ks \[12\] disagree"):
        cli.config_from_file(path)
