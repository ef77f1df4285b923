from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.config_files import ConfigFileError, read_mapping


def test_yaml_and_json_mappings_are_read_and_an_empty_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("ranker:\n  seed: 3\n")
    (tmp_path / "b.json").write_text('{"ranker": {"seed": 4}}')
    (tmp_path / "c.yml").write_text("")
    assert read_mapping(tmp_path / "a.yaml", "config file") == {"ranker": {"seed": 3}}
    assert read_mapping(tmp_path / "b.json", "config file") == {"ranker": {"seed": 4}}
    assert read_mapping(tmp_path / "c.yml", "config file") == {}


def test_a_yaml_syntax_error_is_one_line_with_1_based_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ranker:\n  seed: [1, 2\nencoder: {}\n")
    with pytest.raises(ConfigFileError) as info:
        read_mapping(bad, "config file")
    message = str(info.value)
    assert message.startswith(f"config file {bad} is not valid YAML at line 3, column 8:")
    assert "\n" not in message and "<unicode string>" not in message


def test_a_json_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "ranker": {"seed": 1,}\n}')
    with pytest.raises(ConfigFileError, match=r"bad\.json is not valid JSON at line 2, column 24: "):
        read_mapping(bad, "config file")


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("7\n", "int")])
def test_a_file_that_is_not_a_mapping_is_refused_naming_what_it_holds(
    tmp_path: Path, text: str, kind: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=f"must hold a mapping, got {kind}"):
        read_mapping(path, "config file")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"experiments file .*nope\.yaml does not exist"):
        read_mapping(tmp_path / "nope.yaml", "experiments file")
