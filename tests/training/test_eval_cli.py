from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.tiny_bert import tiny_bert_dir_fixture  # noqa: F401  (pytest fixture)
from training.eval_cli import main, parse_systems


def test_cli_prints_a_table_and_writes_json(synth_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "metrics.json"
    markdown = tmp_path / "metrics.md"
    code = main(
        [
            "--data",
            str(synth_dataset),
            "--test-days",
            "2",
            "--systems",
            "popularity,itemknn",
            "--k",
            "10",
            "50",
            "--no-tune",
            "--out",
            str(out),
            "--markdown",
            str(markdown),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.split("\n\n")
    everyone, known = printed[0].splitlines(), printed[1].splitlines()
    assert everyone[0] == "all test users" and known[0] == "known users (with train history)"
    assert everyone[1].split()[:4] == ["system", "mode", "users", "map@10"]
    assert [line.split()[:2] for line in everyone[3:]] == [
        ["popularity", "all"],
        ["popularity", "novel"],
        ["itemknn", "all"],
        ["itemknn", "novel"],
    ]
    data = json.loads(out.read_text())
    assert [r["system"] for r in data["results"]] == ["popularity", "itemknn"]
    assert data["protocol"]["test_days"] == 2.0 and data["protocol"]["ks"] == [10, 50]
    assert 0.0 <= data["results"][1]["modes"]["all"]["metrics"]["recall@50"] <= 1.0
    assert "| system | mode | users | map@10 |" in markdown.read_text()
    assert "### Known users" in markdown.read_text()


def test_cli_tunes_baselines_on_the_validation_window(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    args = ["--data", str(synth_dataset), "--test-days", "2", "--valid-days", "2", "--systems", "popularity"]
    code = main([*args, "--k", "10", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["results"][0]
    tuning = result["tuning"]
    # The default grid tries three popularity windows; the chosen one is evaluated on test.
    assert len(tuning["trials"]) == 3
    assert result["params"]["popularity_window_days"] == tuning["params"]["popularity_window_days"]
    assert tuning["cutoff"] < json.loads(out.read_text())["protocol"]["cutoff"]


def test_tuned_popularity_window_is_shared_by_every_system(synth_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    args = ["--data", str(synth_dataset), "--test-days", "2", "--systems", "itemknn,repeat_pop"]
    assert main([*args, "--k", "10", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    window = data["protocol"]["tuning"]["popularity"]["params"]["popularity_window_days"]
    assert [r["params"]["popularity_window_days"] for r in data["results"]] == [window, window]
    # Each system's own grid was tuned too (itemknn: 2 x 2 points; repeat_pop: 2).
    assert [len(r["tuning"]["trials"]) for r in data["results"]] == [4, 2]


def test_raw_encoder_is_evaluated_with_the_given_encoder(
    synth_dataset: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSVC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "metrics.json"
    args = ["--data", str(synth_dataset), "--test-days", "2", "--systems", "raw_encoder", "--no-tune"]
    assert main([*args, "--encoder-dir", str(tiny_bert_dir), "--k", "10", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["system"] == "raw_encoder"
    assert result["modes"]["all"]["users"] > 0
    # Text retrieval proposes items by similarity, not popularity, so lists differ across users.
    assert result["modes"]["all"]["metrics"]["coverage@10"] > 0.05


def test_missing_data_folder_exits_2_with_a_message(tmp_path: Path, capsys) -> None:
    code = main(
        ["--data", str(tmp_path / "nope"), "--systems", "popularity", "--out", str(tmp_path / "m.json")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "nope" in err and "Traceback" not in err


def test_unknown_system_exits_2_naming_the_flag(synth_dataset: Path, tmp_path: Path, capsys) -> None:
    code = main(
        ["--data", str(synth_dataset), "--systems", "popularity,bpr", "--out", str(tmp_path / "m.json")]
    )
    assert code == 2
    assert "--systems" in capsys.readouterr().err


def test_bad_k_exits_2(synth_dataset: Path, tmp_path: Path, capsys) -> None:
    code = main(["--data", str(synth_dataset), "--k", "0", "--out", str(tmp_path / "m.json")])
    assert code == 2
    assert "--k" in capsys.readouterr().err


def test_parse_systems_keeps_order_and_drops_repeats() -> None:
    assert parse_systems("als, popularity,als") == ["als", "popularity"]


@pytest.mark.parametrize("text", ["", " , ,"])
def test_empty_systems_list_says_at_least_one_is_needed(
    text: str, synth_dataset: Path, tmp_path: Path, capsys
) -> None:
    code = main(["--data", str(synth_dataset), "--systems", text, "--out", str(tmp_path / "m.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--systems needs at least one system" in err and "unknown" not in err


def test_help_explains_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--test-days",
        "--systems",
        "--k",
        "--out",
        "--no-tune",
        "raw_encoder",
        "--encoder-dir",
    ):
        assert flag in text


def test_test_days_longer_than_the_data_exits_2_without_writing_results(
    synth_dataset: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "m.json"
    code = main(
        ["--data", str(synth_dataset), "--systems", "popularity", "--test-days", "10000", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--test-days" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_encoder_dir_exits_2_before_any_work(synth_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    args = ["--data", str(synth_dataset), "--systems", "popularity,raw_encoder", "--out", str(out)]
    code = main([*args, "--encoder-dir", str(tmp_path / "no-bert")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--encoder-dir" in err and "no-bert" in err
    assert not out.exists()  # refused up front: not even the popularity row was written


def test_encoder_dir_without_a_model_exits_2_naming_it(synth_dataset: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty-bert"
    empty.mkdir()
    args = ["--data", str(synth_dataset), "--systems", "raw_encoder", "--no-tune", "--k", "10"]
    code = main([*args, "--encoder-dir", str(empty), "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert "empty-bert" in err and "Traceback" not in err


def test_help_says_out_is_rewritten_after_each_system(capsys) -> None:
    # A half-finished run leaves a metrics.json with fewer systems; the help must say that can happen.
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "after each system" in " ".join(capsys.readouterr().out.split())


def test_config_file_sets_split_eval_and_baselines_and_flags_override_it(
    synth_dataset: Path, tmp_path: Path
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(
        "split: {test_days: 2}\n"
        "eval: {ks: [10, 20], systems: [popularity], tune: false}\n"
        "baselines: {popularity_window_days: 3.5}\n"
    )
    out = tmp_path / "metrics.json"
    assert main(["--data", str(synth_dataset), "--config", str(config), "--k", "5", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"]["test_days"] == 2.0
    assert data["protocol"]["ks"] == [5]  # the flag wins over eval.ks
    assert data["protocol"]["tuned"] is False
    assert [r["system"] for r in data["results"]] == ["popularity"]
    assert data["results"][0]["params"]["popularity_window_days"] == 3.5


def test_bad_config_file_exits_2_naming_the_file_and_field(
    synth_dataset: Path, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("split: {test_days: -1}\n")
    assert (
        main(["--data", str(synth_dataset), "--config", str(config), "--out", str(tmp_path / "m.json")]) == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("recsvc-eval: error: config file") and "split.test_days" in err and str(config) in err
    )
    assert "Traceback" not in err
