from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsvc.config import TextConfig
from tests.helpers.tiny_bert import tiny_bert_dir_fixture  # noqa: F401  (pytest fixture)
from training.baselines import CandidateGenerator
from training.text_baseline import EncoderRetrieval, cached_catalogue_embeddings, store_catalogue_embeddings

ITEMS = pl.DataFrame(
    {
        "item_id": [f"i{n}" for n in range(8)],
        "title": ["running shoes", "trail running shoes", "red running shoes", "espresso coffee beans",
                  "dark coffee beans", "wool jacket", "blue wool jacket", "garden chair"],
    }
)  # fmt: skip
TRAIN = pl.DataFrame(
    {
        "user_id": ["runner", "runner", "coffee", "other", "other", "other"],
        "item_id": ["i0", "i1", "i3", "i7", "i7", "i5"],
        "timestamp": [10, 20, 30, 40, 50, 60],
        "weight": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    },
    schema_overrides={"weight": pl.Float32},
)


def fitted(tiny_bert_dir: Path, cache: Path) -> EncoderRetrieval:
    model = EncoderRetrieval(tiny_bert_dir, TextConfig(), precision="fp32", cache_dir=cache, progress=False)
    model.fit(TRAIN, ITEMS)
    return model


def test_it_is_a_candidate_generator(tiny_bert_dir: Path, tmp_path: Path) -> None:
    assert isinstance(fitted(tiny_bert_dir, tmp_path), CandidateGenerator)


def test_user_gets_items_nearest_to_their_history(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = fitted(tiny_bert_dir, tmp_path)
    out = model.recommend(["runner"], k=3, exclude_seen=False)
    user = model.user_vectors[model._data.user_row["runner"]]
    expected = np.argsort(-(model.item_embeddings @ user), kind="stable")[:3]
    assert out["item_id"].to_list() == [f"i{n}" for n in expected]
    assert out["rank"].to_list() == [1, 2, 3] and out["sources"].to_list() == ["encoder"] * 3


def test_exclude_seen_removes_history_items(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = fitted(tiny_bert_dir, tmp_path).recommend(["runner"], k=6, exclude_seen=True)
    assert {"i0", "i1"}.isdisjoint(out["item_id"].to_list()) and out.height == 6


def test_unknown_user_gets_popular_items(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = fitted(tiny_bert_dir, tmp_path).recommend(["stranger"], k=2, exclude_seen=False)
    assert out["item_id"].to_list()[0] == "i7" and set(out["sources"].to_list()) == {"popular"}


def test_candidate_frame_schema(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = fitted(tiny_bert_dir, tmp_path).recommend(["runner", "coffee"], k=4, exclude_seen=False)
    assert (
        out.schema["user_id"] == pl.Utf8
        and out.schema["rank"] == pl.Int32
        and out.schema["score"] == pl.Float32
    )
    assert out.group_by("user_id").len().sort("user_id")["len"].to_list() == [4, 4]


def test_catalogue_embeddings_are_cached_and_reused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    first = cached_catalogue_embeddings(
        tiny_bert_dir, ITEMS, TextConfig(), precision="fp32", cache_dir=tmp_path
    )
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    np.save(files[0], first * 0 + 0.5)  # a changed cache file must be what is returned
    assert np.all(
        cached_catalogue_embeddings(tiny_bert_dir, ITEMS, TextConfig(), precision="fp32", cache_dir=tmp_path)
        == 0.5
    )


def test_changed_text_config_misses_the_cache(tiny_bert_dir: Path, tmp_path: Path) -> None:
    cached_catalogue_embeddings(tiny_bert_dir, ITEMS, TextConfig(), precision="fp32", cache_dir=tmp_path)
    cached_catalogue_embeddings(
        tiny_bert_dir, ITEMS, TextConfig(description_chars=10), precision="fp32", cache_dir=tmp_path
    )
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_recommend_before_fit_is_an_error(tiny_bert_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="fit"):
        EncoderRetrieval(tiny_bert_dir).recommend(["u"], k=1, exclude_seen=False)


def test_stored_embeddings_are_what_the_cache_lookup_returns(tiny_bert_dir: Path, tmp_path: Path) -> None:
    stored = np.full((ITEMS.height, 32), 0.25, dtype=np.float32)
    file = store_catalogue_embeddings(tiny_bert_dir, ITEMS, TextConfig(), stored, "fp32", cache_dir=tmp_path)
    assert list(tmp_path.glob("*.npy")) == [file]
    found = cached_catalogue_embeddings(
        tiny_bert_dir, ITEMS, TextConfig(), precision="fp32", cache_dir=tmp_path
    )
    np.testing.assert_array_equal(found, stored)


def test_storing_embeddings_for_another_catalogue_size_is_an_error(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="3 embeddings for 8 catalogue items"):
        store_catalogue_embeddings(tiny_bert_dir, ITEMS, TextConfig(), np.zeros((3, 32)), "fp32", tmp_path)
