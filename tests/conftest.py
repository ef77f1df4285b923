"""Shared pytest fixtures.

`synth_dataset` (session scope): Path to a canonical data folder (interactions.parquet +
items.parquet) written once per test session by `training.synth.write_dataset` with the sizes in
`SYNTH_SIZES` (300 users, 200 items, 6 000 interactions over 14 days, seed 7, timestamps from
2024-01-01 UTC). Contents are deterministic. Columns: interactions user_id, item_id, timestamp,
event (view/click/cart/purchase); items item_id, title, description, category, brand, price.
Treat it as read-only; copy it if a test needs to modify files.

`synth_loaded` (session scope): the same folder loaded with `training.data.load_dataset`
(default DataConfig), i.e. a `Dataset` with `.interactions`, `.items`, `.report`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data import Dataset, load_dataset
from training.synth import write_dataset

SYNTH_SIZES = {"n_users": 300, "n_items": 200, "n_interactions": 6_000, "days": 14, "seed": 7}


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic synthetic canonical folder (see module docstring)."""
    return write_dataset(tmp_path_factory.mktemp("synth") / "data", **SYNTH_SIZES)


@pytest.fixture(scope="session")
def synth_loaded(synth_dataset: Path) -> Dataset:
    """`synth_dataset` loaded and validated."""
    return load_dataset(synth_dataset)
