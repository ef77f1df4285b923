"""The one place item text and query text are built.

Training, catalogue embedding and serving must feed BERT the same string for the same item,
otherwise fine-tuned embeddings and served embeddings drift apart. Everything that needs item text
calls `item_texts`.
"""

from __future__ import annotations

import re
import unicodedata

import polars as pl

from recsvc.config import TextConfig

_WHITESPACE = re.compile(r"\s+")


class TextConfigError(ValueError):
    """The catalogue cannot produce item text with this TextConfig (e.g. no title column)."""


def _clean(value: object) -> str:
    """Stringify a cell; nulls and blank strings become "" so they are skipped."""
    if value is None:
        return ""
    text = str(value)
    return _WHITESPACE.sub(" ", text).strip()


def _truncate(text: str, max_chars: int) -> str:
    """Cut at a word boundary so BERT does not see half a word."""
    if max_chars <= 0:
        return ""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.") + "…"


def _label(column: str) -> str:
    return column.replace("_", " ")


def item_texts(items: pl.DataFrame, cfg: TextConfig) -> list[str]:
    """One string per row of `items`, in row order.

    Format: ``"{title}. {attr}: {value}; {attr}: {value}. {description}"``; attribute columns
    absent from the catalogue or null for an item are skipped, as is a missing description.
    """
    if cfg.title_column not in items.columns:
        raise TextConfigError(
            f"items has no title column {cfg.title_column!r} (columns: {', '.join(items.columns)})"
        )
    titles = items.get_column(cfg.title_column).to_list()
    attributes = [
        (_label(c), items.get_column(c).to_list()) for c in cfg.attribute_columns if c in items.columns
    ]
    descriptions = (
        items.get_column(cfg.description_column).to_list()
        if cfg.description_column in items.columns
        else [None] * items.height
    )
    texts: list[str] = []
    for row in range(items.height):
        parts = []
        title = _clean(titles[row])
        if title:
            parts.append(title)
        attrs = [f"{label}: {v}" for label, values in attributes if (v := _clean(values[row]))]
        if attrs:
            parts.append("; ".join(attrs))
        description = _truncate(_clean(descriptions[row]), cfg.description_chars)
        if description:
            parts.append(description)
        texts.append(". ".join(p.rstrip(".") for p in parts))
    return texts


def query_text(q: str) -> str:
    """Normalise a free-text query: Unicode NFKC, no control characters, single spaces."""
    text = unicodedata.normalize("NFKC", q)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    return _WHITESPACE.sub(" ", text).strip()
