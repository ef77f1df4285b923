from __future__ import annotations

import polars as pl
import pytest

from recsvc.config import TextConfig
from recsvc.text import TextConfigError, item_texts, query_text

CFG = TextConfig(attribute_columns=("category", "brand"), description_chars=30)


def test_item_text_joins_title_attributes_and_description() -> None:
    items = pl.DataFrame(
        {"title": ["Pegasus 40"], "category": ["running shoes"], "brand": ["Nike"], "description": ["Light."]}
    )
    assert item_texts(items, CFG) == ["Pegasus 40. category: running shoes; brand: Nike. Light"]


def test_item_text_skips_null_blank_and_absent_attribute_columns() -> None:
    items = pl.DataFrame(
        {"title": ["Mug", "Cup"], "category": [None, "  "], "description": [None, "Blue cup"]}
    )
    assert item_texts(items, CFG) == ["Mug", "Cup. Blue cup"]


def test_item_text_truncates_description_at_a_word_boundary() -> None:
    long = "soft cotton jersey with a relaxed fit and dropped shoulders"
    items = pl.DataFrame({"title": ["Tee"], "description": [long]})
    text = item_texts(items, CFG)[0]
    assert text == "Tee. soft cotton jersey with a…"


def test_item_text_collapses_whitespace_inside_cells() -> None:
    items = pl.DataFrame({"title": ["  Trail \n runner  "], "brand": ["Acme\tCo"]})
    assert item_texts(items, CFG) == ["Trail runner. brand: Acme Co"]


def test_item_text_labels_underscored_columns_with_spaces() -> None:
    items = pl.DataFrame({"title": ["Dress"], "product_type": ["Dress"]})
    assert item_texts(items, TextConfig(attribute_columns=("product_type",))) == [
        "Dress. product type: Dress"
    ]


def test_item_text_without_title_column_names_the_column() -> None:
    with pytest.raises(TextConfigError, match="'title'"):
        item_texts(pl.DataFrame({"name": ["x"]}), CFG)


def test_query_text_normalises_unicode_controls_and_spaces() -> None:
    assert query_text("  ｒunning\u0000 shoes\n\tfor  trail ") == "running shoes for trail"
