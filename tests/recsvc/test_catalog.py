from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsvc.catalog import Catalog, UnknownAttributeError


def _items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "title": ["red shoe", "blue shoe", "mug", "tea"],
            "category": ["shoes", "shoes", "kitchen", None],
            "brand": ["acme", "zeta", "acme", "zeta"],
            "material": ["wool", "cotton", "clay", "leaf"],  # not configured, few values -> attribute
            "price": [10.0, 20.0, None, 4.0],
        }
    )


def test_from_items_maps_ids_to_rows_in_order() -> None:
    cat = Catalog.from_items(_items())
    assert cat.item_ids.tolist() == ["a", "b", "c", "d"]
    assert cat.index == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_attribute_codes_are_sorted_value_positions_with_minus_one_for_missing() -> None:
    cat = Catalog.from_items(_items())
    assert cat.attribute_values["category"] == ["kitchen", "shoes"]
    assert cat.attributes["category"].tolist() == [1, 1, 0, -1]


def test_unconfigured_low_cardinality_string_columns_become_attributes_but_titles_do_not() -> None:
    cat = Catalog.from_items(_items(), attribute_columns=("category",))
    assert list(cat.attributes) == ["category", "brand", "material"]
    assert "title" not in cat.attributes


def test_price_is_float32_with_nan_for_missing_and_all_nan_without_column() -> None:
    cat = Catalog.from_items(_items())
    assert cat.price.dtype == np.float32
    assert np.isnan(cat.price[2]) and cat.price[3] == pytest.approx(4.0)
    no_price = Catalog.from_items(_items().drop("price"))
    assert np.isnan(no_price.price).all() and not no_price.has_price


def test_duplicate_item_ids_are_rejected_naming_the_column() -> None:
    items = pl.DataFrame({"item_id": ["a", "a"], "title": ["x", "y"]})
    with pytest.raises(ValueError, match="item_id"):
        Catalog.from_items(items)


def test_save_then_load_round_trips_codes_values_and_price(tmp_path: Path) -> None:
    cat = Catalog.from_items(_items())
    cat.save(tmp_path / "catalog.parquet")
    back = Catalog.load(tmp_path / "catalog.parquet")
    assert back.item_ids.tolist() == cat.item_ids.tolist()
    assert back.attribute_values == cat.attribute_values
    for name in cat.attributes:
        assert back.attributes[name].tolist() == cat.attributes[name].tolist()
    np.testing.assert_array_equal(back.price, cat.price)


def test_filter_mask_combines_include_and_exclude() -> None:
    cat = Catalog.from_items(_items())
    mask = cat.filter_mask({"category": ["shoes", "kitchen"]}, {"brand": ["zeta"]})
    assert mask is not None
    assert mask.tolist() == [True, False, True, False]


def test_filter_mask_is_none_without_filters_and_unknown_values_match_nothing() -> None:
    cat = Catalog.from_items(_items())
    assert cat.filter_mask({}, {}) is None
    assert not cat.value_mask("brand", ["nope"]).any()


def test_filter_on_unknown_attribute_names_it() -> None:
    cat = Catalog.from_items(_items())
    with pytest.raises(UnknownAttributeError, match="colour"):
        cat.filter_mask({"colour": ["red"]})


def test_ids_to_indices_splits_known_and_unknown() -> None:
    cat = Catalog.from_items(_items())
    idx, unknown = cat.ids_to_indices(["c", "zz", "a"])
    assert idx.tolist() == [2, 0] and unknown == ["zz"]


def test_unknown_values_lists_include_and_exclude_values_no_item_has_sorted_and_distinct() -> None:
    cat = Catalog.from_items(_items())
    unknown = cat.unknown_values(
        {"category": ["shoes", "shoez"], "brand": ["acme"]},
        {"brand": ["nope", "zeta"], "category": ["shoez"]},
    )
    assert unknown == ["brand=nope", "category=shoez"]


def test_unknown_values_is_empty_for_known_values_and_for_no_filters() -> None:
    cat = Catalog.from_items(_items())
    assert cat.unknown_values({"category": ["kitchen"]}, {"material": ["wool", "leaf"]}) == []
    assert cat.unknown_values() == []


def test_unknown_values_counts_the_empty_string_as_unknown_because_it_means_missing() -> None:
    cat = Catalog.from_items(_items())
    assert cat.unknown_values({"category": [""]}) == ["category="]
    assert not cat.value_mask("category", [""]).any()


def test_unknown_values_on_unknown_attribute_names_it() -> None:
    cat = Catalog.from_items(_items())
    with pytest.raises(UnknownAttributeError, match="colour"):
        cat.unknown_values(exclude={"colour": ["red"]})


def test_value_mask_matches_items_with_any_listed_value_and_ignores_unknown_ones() -> None:
    cat = Catalog.from_items(_items())
    assert cat.value_mask("category", ["shoes"]).tolist() == [True, True, False, False]
    assert cat.value_mask("category", ["kitchen", "shoez"]).tolist() == [False, False, True, False]
    assert cat.value_mask("brand", ["acme", "zeta"]).tolist() == [True, True, True, True]


def test_value_codes_invert_attribute_values_after_save_and_load(tmp_path: Path) -> None:
    cat = Catalog.from_items(_items())
    cat.save(tmp_path / "catalog.parquet")
    back = Catalog.load(tmp_path / "catalog.parquet")
    for catalog in (cat, back):
        for name, values in catalog.attribute_values.items():
            assert catalog.value_codes[name] == {v: code for code, v in enumerate(values)}
