"""Build a small but REAL serving bundle from synthetic data, for tests of the request path.

Everything is the production code: catalogue, histories, item stats and co-occurrence from the
interactions, a real FAISS ItemIndex, a real LightGBM lambdarank `Ranker` trained on leak-free ranking
sets (training/train_ranker.py), a tiny random BERT as the query encoder. Only the item
embeddings are synthetic (category centre + noise) so ANN results are meaningful without
fine-tuning. Usage:

    from tests.helpers.bundle_builder import build_loaded_bundle, write_bundle

    bundle = build_loaded_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path)
    rec = Recommender(bundle)

    root = write_bundle(synth_loaded.interactions, synth_loaded.items, tmp_path / "bundles")
    bundle = recsvc.bundle.load(root)      # through the real loader (checksums etc.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsvc.catalog import Catalog
from recsvc.config import DAY, TrainConfig, to_dict
from recsvc.user_tower import TowerParams
from tests.helpers.tiny_bert import make_tiny_bert
from training.train_ranker import build_ranking_dataset, relevance_grades, state_at

EMBED_DIM = 32  # = tiny BERT hidden size, so free-text queries land in the same space


def category_embeddings(
    items: pl.DataFrame, dim: int = EMBED_DIM, seed: int = 0, noise: float = 0.6
) -> np.ndarray:
    """Unit vectors clustered by the items' `category` column (random when there is none)."""
    rng = np.random.default_rng(seed)
    n = items.height
    if "category" in items.columns:
        _, codes = np.unique(items["category"].fill_null("").to_numpy().astype(str), return_inverse=True)
    else:
        codes = np.zeros(n, dtype=np.int64)
    centres = rng.normal(size=(int(codes.max()) + 1, dim))
    emb = centres[codes] + noise * rng.normal(size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


def untrained_tower(dim: int, history_len: int) -> TowerParams:
    """Tower weights at their initial values: attention-free mean pooling (a valid tower)."""
    return TowerParams(
        query=np.zeros(dim, np.float32),
        age_coef=np.zeros((), np.float32),
        weight_coef=np.zeros((), np.float32),
        position_bias=np.zeros(history_len, np.float32),
        linear=np.zeros((dim, dim), np.float32),
        bias=np.zeros(dim, np.float32),
    )


def build_index(emb: np.ndarray, config: TrainConfig) -> Any:
    """The production FAISS index (exact at test sizes)."""
    from recsvc.retrieval import ItemIndex

    return ItemIndex.build(emb, config.index)


def train_small_ranker(
    features: np.ndarray, grades: np.ndarray, groups: np.ndarray, fast_path: bool = False
) -> Any:
    """A real `recsvc.ranker.Ranker` (small LightGBM lambdarank).

    `fast_path=False` serves with stock `Booster.predict` so tests skip the native compile; the
    Ranker's own tests cover that the fast path gives the same scores.
    """
    from recsvc.config import RankerConfig
    from recsvc.features import FEATURE_NAMES
    from recsvc.ranker import Ranker

    cfg = RankerConfig(
        num_leaves=7, min_data_in_leaf=5, num_boost_round=20, learning_rate=0.1, search_trials=1
    )
    ranker = Ranker.train(features, grades, groups, None, None, None, cfg, feature_names=list(FEATURE_NAMES))
    if not fast_path:
        ranker.disable_fast_path()
    return ranker


def ranker_on_window(
    interactions: pl.DataFrame,
    *,
    cutoff: int,
    label_end: int,
    catalog: Catalog,
    item_emb: np.ndarray,
    index: Any,
    tower: TowerParams,
    config: TrainConfig,
    fast_path: bool = False,
) -> Any:
    """`train_small_ranker` on the leak-free ranking set with state < `cutoff`, labels [cutoff, label_end)."""
    train = build_ranking_dataset(
        interactions,
        interactions,
        cutoff=cutoff,
        label_end=label_end,
        catalog=catalog,
        item_emb=item_emb,
        index=index,
        tower=tower,
        cand_cfg=config.candidates,
        max_users=config.ranker.max_train_users,
        cf_cfg=config.collaborative,
    )
    return train_small_ranker(train.features, relevance_grades(train.labels), train.groups, fast_path)


def build_loaded_bundle(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    workdir: Path,
    config: TrainConfig | None = None,
    seed: int = 0,
    fast_path: bool = False,
) -> Any:
    """A `recsvc.bundle.LoadedBundle` assembled in memory from real parts (see module doc)."""
    cfg = config or TrainConfig()
    catalog = Catalog.from_items(items, cfg.text.attribute_columns)
    emb = category_embeddings(items, seed=seed)
    index = build_index(emb, cfg)
    tower = untrained_tower(EMBED_DIM, cfg.encoder.history_len)
    end = int(interactions["timestamp"].max()) + 1
    ranker = ranker_on_window(
        interactions,
        cutoff=end - 2 * DAY,
        label_end=end,
        catalog=catalog,
        item_emb=emb,
        index=index,
        tower=tower,
        config=cfg,
        fast_path=fast_path,
    )
    state = state_at(interactions, catalog, end, cfg.candidates, cfg.collaborative)
    encoder_dir = make_tiny_bert(Path(workdir) / "encoder", hidden=EMBED_DIM)
    return state.bundle(
        path=Path(workdir),
        version="test-bundle",
        config=cfg,
        catalog=catalog,
        item_emb=emb,
        index=index,
        tower=tower,
        ranker=ranker,
        encoder_dir=encoder_dir,
    )


def write_bundle(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    bundles_root: Path,
    config: TrainConfig | None = None,
    seed: int = 0,
) -> Path:
    """Publish a real bundle directory (every part saved by its own `save`) and return the root.

    Needs recsvc.retrieval.ItemIndex and recsvc.ranker.Ranker (their save formats).
    """
    from recsvc import bundle as bundle_mod
    from recsvc.features import FEATURE_NAMES
    from recsvc.user_tower import save_params

    root = Path(bundles_root)
    staging = bundle_mod.new_staging_dir(root)
    loaded = build_loaded_bundle(interactions, items, staging / "_work", config, seed)
    loaded.catalog.save(staging / "catalog.parquet")
    np.save(staging / "item_embeddings.npy", loaded.item_embeddings)
    loaded.index.save(staging)
    save_params(loaded.tower, staging / "user_tower.npz")
    loaded.ranker.save(staging / "ranker")
    loaded.history.save(staging / "history.parquet")
    loaded.item_stats.save(staging / "item_stats.npz")
    loaded.cooccurrence.save(staging / "cooccurrence.npz")
    if loaded.cf is not None:
        loaded.cf.save(staging / bundle_mod.CF_FILE)
    (staging / "_work" / "encoder").rename(staging / "encoder")
    (staging / "_work").rmdir()
    bundle_mod.publish(
        staging,
        root,
        {
            "config": to_dict(loaded.config),
            "data_end_ts": loaded.data_end_ts,
            "item_count": len(loaded.catalog),
            "feature_names": list(FEATURE_NAMES),
            "metrics": {},
        },
    )
    return root
