"""Reading the YAML / JSON files users write (train and serve configs, experiments), with errors
that fit on one line and name the file.

Why one place: PyYAML's own message spans several lines and calls the file '<unicode string>';
every file a user writes should be reported the same way, with 1-based line and column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """A config file is missing, unreadable or not a mapping (the message names the file)."""


def parse_problem(exc: Exception) -> str:
    """A YAML or JSON parse error as one line: 'at line L, column C: problem (context at ...)'."""
    import yaml

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    if isinstance(exc, json.JSONDecodeError):
        return f" at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if not isinstance(exc, yaml.YAMLError) or mark is None or not problem:
        return ": " + " ".join(str(exc).split())
    text = f" at {at(mark)}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at {at(context_mark)})"
    return text


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a JSON (`.json`) or YAML (anything else) file; an empty file is {}.

    `what` names the file in messages ("config file", "experiments file").
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"{what} {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {what} {p}: {exc}") from None
    kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"{what} {p} is not valid {kind}{parse_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{what} {p} must hold a mapping, got {type(data).__name__}")
    return data
