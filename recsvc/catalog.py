"""The item catalogue as serving needs it: id <-> row index, categorical attribute codes, price.

Row `i` of every per-item array in a bundle (embeddings, stats, index ids) is catalogue item `i`.
Attributes are integer codes so filters, affinity features and the diversity cap are array lookups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsvc.config import TextConfig

# A string column with fewer distinct values than this is treated as a categorical attribute.
MAX_ATTRIBUTE_VALUES = 10_000
# Columns that are free text or identifiers, never attributes.
NON_ATTRIBUTE_COLUMNS = frozenset({"item_id", "title", "description", "price"})
# Bound on lazily cached per-value masks (each is n_items bytes).
_MASK_CACHE_SIZE = 512


class UnknownAttributeError(ValueError):
    """A filter names an attribute the catalogue does not have."""


@dataclass
class Catalog:
    """Items of one bundle; see docs/ARCHITECTURE.md "Serving state"."""

    item_ids: np.ndarray  # object [n]
    index: dict[str, int]
    attributes: dict[str, np.ndarray]  # name -> int32 codes [n], -1 = missing
    attribute_values: dict[str, list[str]]  # name -> value per code
    price: np.ndarray  # float32 [n], nan when absent
    _mask_cache: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)
    # name -> {value: code}, the inverse of attribute_values: a filter value is one dict lookup.
    value_codes: dict[str, dict[str, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.value_codes = {
            name: {value: code for code, value in enumerate(values)}
            for name, values in self.attribute_values.items()
        }

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def has_price(self) -> bool:
        return bool(np.isfinite(self.price).any())

    @classmethod
    def from_items(
        cls, items: pl.DataFrame, attribute_columns: Sequence[str] = TextConfig().attribute_columns
    ) -> Catalog:
        """Build from the canonical items frame (`item_id` unique, optional `price`).

        Attributes are the configured columns that are present, then any other string column with
        fewer than MAX_ATTRIBUTE_VALUES distinct values (so catalogues with unusual columns still
        get filters and affinity features).
        """
        if "item_id" not in items.columns:
            raise ValueError("items frame has no 'item_id' column")
        item_ids = np.asarray(items["item_id"].cast(pl.Utf8).to_list(), dtype=object)
        index = {item_id: i for i, item_id in enumerate(item_ids)}
        if len(index) != len(item_ids):
            raise ValueError("items frame column 'item_id' has duplicate values")
        names = [c for c in attribute_columns if c in items.columns]
        for col, dtype in items.schema.items():
            if col in names or col in NON_ATTRIBUTE_COLUMNS or dtype not in (pl.Utf8, pl.Categorical):
                continue
            if items[col].n_unique() < MAX_ATTRIBUTE_VALUES:
                names.append(col)
        attributes: dict[str, np.ndarray] = {}
        values: dict[str, list[str]] = {}
        for name in names:
            attributes[name], values[name] = _encode(items[name].cast(pl.Utf8))
        if "price" in items.columns:
            price = items["price"].cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32)
        else:
            price = np.full(len(item_ids), np.nan, dtype=np.float32)
        return cls(item_ids, index, attributes, values, price)

    def ids_to_indices(self, item_ids: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """Known ids -> int32 row indices (order kept), plus the ids that are not in the catalogue."""
        known: list[int] = []
        unknown: list[str] = []
        for item_id in item_ids:
            i = self.index.get(item_id)
            if i is None:
                unknown.append(item_id)
            else:
                known.append(i)
        return np.asarray(known, dtype=np.int32), unknown

    def value_mask(self, attribute: str, values: Iterable[str]) -> np.ndarray:
        """Boolean mask over all items whose `attribute` is one of `values` (unknown values match nothing)."""
        codes = self._codes(attribute)
        mask = np.zeros(len(self), dtype=bool)
        for value in values:
            mask |= self._single_value_mask(attribute, codes, value)
        return mask

    def unknown_values(
        self,
        include: Mapping[str, Iterable[str]] | None = None,
        exclude: Mapping[str, Iterable[str]] | None = None,
    ) -> list[str]:
        """Filter values no catalogue item has, as sorted, distinct `attribute=value` strings.

        Such a value matches nothing (see `value_mask`), which is on purpose but silent: a typo in
        an include filter empties the answer, one in an exclude filter removes nothing. Serving
        reports these so the caller can tell a typo from a genuinely empty selection.
        """
        unknown: set[str] = set()
        for filters in (include or {}, exclude or {}):
            for attribute, values in filters.items():
                self._codes(attribute)  # an unknown attribute NAME is an error, not a report
                codes = self.value_codes[attribute]
                unknown.update(f"{attribute}={value}" for value in values if value not in codes)
        return sorted(unknown)

    def filter_mask(
        self,
        include: Mapping[str, Iterable[str]] | None = None,
        exclude: Mapping[str, Iterable[str]] | None = None,
    ) -> np.ndarray | None:
        """Items allowed by include (every named attribute must match) and exclude filters.

        None when there is no filter, so callers can skip masking entirely.
        """
        if not include and not exclude:
            return None
        mask = np.ones(len(self), dtype=bool)
        for attribute, values in (include or {}).items():
            mask &= self.value_mask(attribute, values)
        for attribute, values in (exclude or {}).items():
            mask &= ~self.value_mask(attribute, values)
        return mask

    def id_series(self) -> pl.Series:
        """The item ids as a polars String series "item_id", row i = item i."""
        return pl.Series("item_id", self.item_ids.tolist(), dtype=pl.Utf8)

    def save(self, path: str | Path) -> None:
        """One parquet file: item_id, price and the attribute columns as strings."""
        columns: dict[str, pl.Series] = {
            "item_id": self.id_series(),
            "price": pl.Series("price", self.price, dtype=pl.Float32),
        }
        for name, codes in self.attributes.items():
            lookup = np.asarray([*self.attribute_values[name], None], dtype=object)
            columns[name] = pl.Series(name, lookup[codes].tolist(), dtype=pl.Utf8)
        pl.DataFrame(columns).write_parquet(Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """Inverse of `save`; codes are rebuilt identically (values are sorted)."""
        frame = pl.read_parquet(Path(path))
        item_ids = np.asarray(frame["item_id"].to_list(), dtype=object)
        attributes: dict[str, np.ndarray] = {}
        values: dict[str, list[str]] = {}
        for name in frame.columns:
            if name in ("item_id", "price"):
                continue
            attributes[name], values[name] = _encode(frame[name])
        price = frame["price"].fill_null(float("nan")).to_numpy().astype(np.float32)
        return cls(item_ids, {item_id: i for i, item_id in enumerate(item_ids)}, attributes, values, price)

    def _codes(self, attribute: str) -> np.ndarray:
        codes = self.attributes.get(attribute)
        if codes is None:
            known = ", ".join(sorted(self.attributes)) or "none"
            raise UnknownAttributeError(f"unknown item attribute {attribute!r} (catalogue has: {known})")
        return codes

    def _single_value_mask(self, attribute: str, codes: np.ndarray, value: str) -> np.ndarray:
        key = (attribute, value)
        mask = self._mask_cache.get(key)
        if mask is None:
            code = self.value_codes[attribute].get(value, -2)  # -2 matches nothing
            mask = codes == code
            if len(self._mask_cache) >= _MASK_CACHE_SIZE:
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = mask
        return mask


def _encode(column: pl.Series) -> tuple[np.ndarray, list[str]]:
    """String column -> (int32 codes with -1 for null/empty, sorted distinct values)."""
    raw = column.to_list()
    values = sorted({v for v in raw if v})
    lookup = {v: i for i, v in enumerate(values)}
    codes = np.fromiter((lookup.get(v, -1) if v else -1 for v in raw), dtype=np.int32, count=len(raw))
    return codes, values
