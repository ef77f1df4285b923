from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsvc.config import TextConfig
from recsvc.encoder import TextEncoder
from recsvc.text import item_texts
from tests.helpers.tiny_bert import tiny_bert_dir_fixture  # noqa: F401  (pytest fixture)
from training.embed import embed_catalogue

ITEMS = pl.DataFrame(
    {
        "item_id": ["a", "b", "c", "d"],
        "title": ["running shoes", "wool jacket", "espresso coffee beans", "blue mug"],
        "category": ["shoes", None, "coffee", "kitchen"],
    }
)


def test_every_item_gets_a_unit_vector_in_catalogue_order(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    ids, emb = embed_catalogue(encoder, ITEMS, TextConfig(), batch_size=3, progress=False)
    assert ids.tolist() == ["a", "b", "c", "d"]
    assert emb.shape == (4, encoder.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[2], encoder.encode([item_texts(ITEMS, TextConfig())[2]])[0], atol=1e-5)


def test_items_without_item_id_are_rejected(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    with pytest.raises(ValueError, match="item_id"):
        embed_catalogue(encoder, ITEMS.drop("item_id"), TextConfig(), progress=False)
