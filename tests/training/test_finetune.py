from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsvc.config import DAY, EncoderConfig, TextConfig
from recsvc.encoder import TextEncoder, cpu_supports_bf16
from recsvc.text import item_texts
from recsvc.user_tower import UserTower, load_params, user_vectors
from tests.helpers.tiny_bert import tiny_bert_dir_fixture  # noqa: F401  (pytest fixture)
from training.finetune import (
    FinetuneError,
    FinetuneHistory,
    Histories,
    TrainingPairs,
    build_pairs,
    choose_tower,
    finetune,
    last_histories,
    lr_factor,
    sampled_softmax_loss,
    split_recent_pairs,
)
from training.text_baseline import cached_catalogue_embeddings

REPO = Path(__file__).resolve().parents[2]
TOPICS = [
    ("running", "shoes"),
    ("espresso", "coffee"),
    ("wool", "jacket"),
    ("laptop", "case"),
    ("garden", "chair"),
]
COLOURS = ["red", "blue", "green", "black", "white", "grey"]
START = 1_600_000_000


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: OpenMP spinning across threads costs 100x the maths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cycle_dataset(n_users: int = 100, steps: int = 6, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Users walk topics in a fixed cycle (topic t -> t+1), one purchase a day.

    The next item is predictable from the text of the last one, but NOT similar to it, so the raw
    encoder is poor and learning is visible.
    """
    rng = np.random.default_rng(seed)
    items = pl.DataFrame(
        [
            {"item_id": f"i{t * len(COLOURS) + c}", "title": f"{colour} {a} {b}", "category": a}
            for t, (a, b) in enumerate(TOPICS)
            for c, colour in enumerate(COLOURS)
        ]
    )
    rows = []
    for u in range(n_users):
        first = int(rng.integers(len(TOPICS)))
        for k in range(steps):
            topic = (first + k) % len(TOPICS)
            item = topic * len(COLOURS) + int(rng.integers(len(COLOURS)))
            rows.append((f"u{u:03d}", f"i{item}", START + k * DAY + u, "purchase", None, 1.0))
    schema = {
        "user_id": pl.Utf8,
        "item_id": pl.Utf8,
        "timestamp": pl.Int64,
        "event": pl.Utf8,
        "value": pl.Float64,
        "weight": pl.Float32,
    }
    inter = pl.DataFrame(rows, schema=schema, orient="row").sort("timestamp")
    return inter, items


def small_cfg(model_dir: Path, **overrides: object) -> EncoderConfig:
    base = EncoderConfig(
        model_dir=str(model_dir),
        history_len=4,
        batch_size=16,
        epochs=4,
        lr=3e-4,
        tower_lr=1e-2,
        eval_every=10,
        early_stopping_patience=10,
        checkpoint_every=5,
        valid_k=len(COLOURS),
        tower_refit_steps=60,
        precision="fp32",
        embed_batch_size=64,
    )
    return replace(base, **overrides)


# ----------------------------------------------------------------------------- loss


def test_loss_masks_duplicate_positives_and_subtracts_log_q_by_hand() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # columns: item 7, item 7 again, item 9
    ids = torch.tensor([7, 7, 9])
    log_q = torch.log(torch.tensor([0.5, 0.5, 0.25]))
    loss = sampled_softmax_loss(users, items, ids, torch.tensor([0, 2]), temperature=0.5, log_q=log_q,
                                row_weights=torch.tensor([1.0, 3.0]))  # fmt: skip
    # row 0 (positive item 7 in column 0): column 1 is the same item -> masked out.
    row0 = [1 / 0.5 - math.log(0.5), 0 / 0.5 - math.log(0.25)]
    ce0 = -row0[0] + math.log(sum(math.exp(x) for x in row0))
    # row 1 (positive item 9): both item-7 columns are negatives.
    row1 = [0 - math.log(0.5), 0 - math.log(0.5), 1 / 0.5 - math.log(0.25)]
    ce1 = -row1[2] + math.log(sum(math.exp(x) for x in row1))
    assert loss.item() == pytest.approx((1 * ce0 + 3 * ce1) / 4, rel=1e-6)


def test_loss_without_duplicates_or_log_q_is_plain_in_batch_cross_entropy() -> None:
    torch.manual_seed(0)
    users, items = torch.randn(4, 3), torch.randn(4, 3)
    targets = torch.arange(4)
    expected = torch.nn.functional.cross_entropy(users @ items.T / 0.1, targets)
    got = sampled_softmax_loss(users, items, torch.tensor([1, 2, 3, 4]), targets, temperature=0.1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lr_schedule_warms_up_linearly_then_decays_to_zero() -> None:
    assert [lr_factor(s, total=10, warmup=2) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------- pairs


def tiny_log() -> tuple[pl.DataFrame, dict[str, int]]:
    inter = pl.DataFrame(
        {"user_id": ["a", "b", "a", "a", "b"], "item_id": ["x", "y", "y", "z", "x"],
         "timestamp": [1, 2, 2, 3, 5], "weight": [1.0, 1.0, 2.0, 8.0, 4.0]}
    )  # fmt: skip
    return inter, {"x": 0, "y": 1, "z": 2}


def test_pairs_use_earlier_items_most_recent_first_with_ages() -> None:
    inter, index = tiny_log()
    pairs = build_pairs(inter, index, history_len=2, max_pairs=100)
    assert pairs.targets.tolist() == [1, 2, 0]  # a: x->y, a: (y, x)->z, b: y->x
    assert pairs.context.items.tolist() == [[0, -1], [1, 0], [1, -1]]
    assert pairs.context.ages_s.tolist() == [[1, 0], [1, 2], [3, 0]]
    assert pairs.weights.tolist() == [2.0, 8.0, 4.0]


def test_pairs_cap_keeps_the_most_recent() -> None:
    inter, index = tiny_log()
    pairs = build_pairs(inter, index, history_len=2, max_pairs=2)
    assert sorted(pairs.timestamps.tolist()) == [3, 5]


def recurrence_pairs(n_items: int = 8, shift: int = 0) -> TrainingPairs:
    """One pair per item: context = that item alone, target = the item `shift` places later."""
    items = np.arange(n_items, dtype=np.int32)
    context = Histories(items[:, None], np.zeros((n_items, 1), np.float32), np.ones((n_items, 1), np.float32))
    return TrainingPairs(
        context, (items + shift) % n_items, np.ones(n_items, np.float32), items.astype(np.int64)
    )


def test_split_recent_pairs_holds_out_the_newest_pairs() -> None:
    pairs = recurrence_pairs(10)
    fit, holdout = split_recent_pairs(pairs, 3)
    assert holdout is not None
    assert sorted(holdout.timestamps.tolist()) == [7, 8, 9]
    assert sorted(fit.timestamps.tolist()) == list(range(7))


def test_split_recent_pairs_skips_the_holdout_on_tiny_data() -> None:
    pairs = recurrence_pairs(5)
    fit, holdout = split_recent_pairs(pairs, 3)
    assert holdout is None and len(fit) == 5


def test_choose_tower_ships_recency_pooling_when_the_learned_tower_is_worse() -> None:
    n = 8
    emb = torch.eye(n)
    pooling = UserTower.recency_pooling(n, 1, 3.0)
    learned = UserTower.recency_pooling(n, 1, 3.0)
    with torch.no_grad():
        learned.linear.copy_(-2.0 * torch.eye(n))  # points every user away from their own item
    hist = FinetuneHistory()
    choose_tower(learned, pooling, emb, recurrence_pairs(n), k=1, hist=hist)
    assert hist.tower_choice == "pooling"
    assert hist.tower_holdout_recall == {"learned": 0.0, "pooling": 1.0}
    assert torch.equal(learned.linear, torch.zeros(n, n))


def test_choose_tower_keeps_a_learned_tower_that_beats_pooling() -> None:
    n = 8
    emb = torch.eye(n)
    learned = UserTower.recency_pooling(n, 1, 3.0)
    shift = torch.roll(torch.eye(n), shifts=1, dims=1)  # e_i @ shift = e_(i+1)
    with torch.no_grad():
        learned.linear.copy_(shift - torch.eye(n))
    hist = FinetuneHistory()
    choose_tower(learned, UserTower.recency_pooling(n, 1, 3.0), emb, recurrence_pairs(n, shift=1), 1, hist)
    assert hist.tower_choice == "learned"
    assert torch.equal(learned.linear, shift - torch.eye(n))


def test_last_histories_see_only_events_before_now() -> None:
    inter, index = tiny_log()
    users, hist = last_histories(inter, index, history_len=3, now=3)
    assert users == ["a", "b"]
    assert hist.items.tolist() == [[1, 0, -1], [1, -1, -1]]
    assert hist.ages_s[0].tolist() == [1, 2, 0]


# ----------------------------------------------------------------------------- training


def split(inter: pl.DataFrame, day: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    cut = START + day * DAY
    return inter.filter(pl.col("timestamp") < cut), inter.filter(pl.col("timestamp") >= cut)


def test_finetune_reduces_loss_and_improves_validation_recall(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset()
    train, valid = split(inter, 4)
    result = finetune(
        train, items, small_cfg(tiny_bert_dir), TextConfig(), tmp_path, valid=valid, progress=False
    )
    losses = result.history.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert result.valid_recall_before is not None and result.valid_recall_after is not None
    assert result.valid_recall_after > result.valid_recall_before + 0.2
    assert result.history.tower_refit_losses[-1] < result.history.tower_refit_losses[0]


def test_finetune_outputs_are_what_serving_loads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=30)
    train, _ = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, max_steps=3, tower_refit_steps=5)
    result = finetune(train, items, cfg, TextConfig(), tmp_path, progress=False)
    encoder = TextEncoder.load(result.encoder_dir, precision="fp32")
    np.testing.assert_allclose(
        encoder.encode(item_texts(items, TextConfig())), result.item_embeddings, atol=1e-5
    )
    params = load_params(result.tower_path)
    np.testing.assert_array_equal(params.linear, result.tower_params.linear)
    assert result.item_ids.tolist() == items["item_id"].to_list() and result.steps == 3


def test_resume_continues_from_the_last_checkpoint(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=40)
    train, _ = split(inter, 4)
    first = finetune(
        train,
        items,
        small_cfg(tiny_bert_dir, max_steps=4, tower_refit_steps=1),
        TextConfig(),
        tmp_path,
        progress=False,
    )
    resumed = finetune(train, items, small_cfg(tiny_bert_dir, max_steps=7, tower_refit_steps=1), TextConfig(), tmp_path,
                       progress=False, resume=True)  # fmt: skip
    assert resumed.steps == 7
    assert resumed.history.losses[:4] == first.history.losses
    assert len(resumed.history.losses) == 7


def test_resume_at_the_step_cap_trains_no_further(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=40)
    train, _ = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, max_steps=3, tower_refit_steps=0)
    first = finetune(train, items, cfg, TextConfig(), tmp_path, progress=False)
    again = finetune(train, items, cfg, TextConfig(), tmp_path, progress=False, resume=True)
    assert again.steps == 3 and again.weights_checksum == first.weights_checksum


def test_finetune_without_repeat_users_raises_a_clear_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=5, steps=1)
    with pytest.raises(FinetuneError, match=">= 2 interactions"):
        finetune(inter, items, small_cfg(tiny_bert_dir), TextConfig(), tmp_path, progress=False)


def test_hard_negatives_train_without_error_and_change_the_loss(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=30)
    train, _ = split(inter, 4)
    plain = finetune(train, items, small_cfg(tiny_bert_dir, max_steps=2, tower_refit_steps=0), TextConfig(),
                     tmp_path / "plain", progress=False)  # fmt: skip
    hard = finetune(train, items, small_cfg(tiny_bert_dir, max_steps=2, tower_refit_steps=0, hard_negatives=2),
                    TextConfig(), tmp_path / "hard", progress=False)  # fmt: skip
    assert hard.history.losses[0] > plain.history.losses[0]


def test_tower_vectors_rank_next_topic_items_after_finetuning(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Serving maths (numpy tower over final embeddings) reproduces the validation gain."""
    inter, items = cycle_dataset()
    train, valid = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, max_steps=20)
    result = finetune(train, items, cfg, TextConfig(), tmp_path, valid=valid, progress=False)
    index = {i: n for n, i in enumerate(result.item_ids)}
    users, hist = last_histories(train, index, cfg.history_len, now=START + 4 * DAY)
    emb = result.item_embeddings
    vecs = user_vectors(result.tower_params, emb[hist.items.clip(0)], hist.ages_s, hist.weights, hist.mask)
    top = np.argsort(-(vecs @ emb.T), axis=1)[:, : len(COLOURS)]
    next_topic = {u: int(item[1:]) // len(COLOURS) for u, item in
                  valid.filter(pl.col("timestamp") < START + 5 * DAY).select("user_id", "item_id").iter_rows()}  # fmt: skip
    share = np.mean([np.mean(top[r] // len(COLOURS) == next_topic[u]) for r, u in enumerate(users)])
    assert share > 0.5


# ----------------------------------------------------------------------------- shared raw pass, partial fine-tuning


@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_raw_embeddings_are_bit_identical_to_the_raw_baseline_cache(
    tiny_bert_dir: Path, tmp_path: Path, trainable_layers: int | None
) -> None:
    inter, items = cycle_dataset(n_users=30)
    train, _ = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, max_steps=2, tower_refit_steps=0, trainable_layers=trainable_layers,
                    embed_batch_size=7)  # fmt: skip
    text_cfg = TextConfig(max_tokens=12)  # truncation on: the same token ids on both sides
    result = finetune(train, items, cfg, text_cfg, tmp_path / "ft", progress=False)
    baseline = cached_catalogue_embeddings(
        tiny_bert_dir, items, text_cfg, batch_size=7, precision="fp32", cache_dir=tmp_path / "cache"
    )
    assert result.raw_item_embeddings is not None and result.raw_precision == "fp32"
    np.testing.assert_array_equal(result.raw_item_embeddings, baseline)
    assert not np.array_equal(result.item_embeddings, baseline)  # the tuned vectors moved


@pytest.mark.skipif(not cpu_supports_bf16(), reason="no native bf16 on this CPU")
def test_bf16_raw_embeddings_are_bit_identical_to_the_raw_baseline_cache(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    inter, items = cycle_dataset(n_users=30)
    train, _ = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, max_steps=1, tower_refit_steps=0, trainable_layers=1, precision="bf16")
    result = finetune(train, items, cfg, TextConfig(), tmp_path / "ft", progress=False)
    baseline = cached_catalogue_embeddings(tiny_bert_dir, items, TextConfig(), batch_size=cfg.embed_batch_size,
                                           precision="bf16", cache_dir=tmp_path / "cache")  # fmt: skip
    assert result.raw_precision == "bf16"
    np.testing.assert_array_equal(result.raw_item_embeddings, baseline)


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-5), ("bf16", 2e-2)])
def test_partial_finetune_embeddings_equal_a_full_forward_of_the_saved_encoder(
    tiny_bert_dir: Path, tmp_path: Path, precision: str, atol: float
) -> None:
    if precision == "bf16" and not cpu_supports_bf16():
        pytest.skip("no native bf16 on this CPU")
    inter, items = cycle_dataset(n_users=30)
    train, _ = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, max_steps=4, tower_refit_steps=0, trainable_layers=1, precision=precision)
    result = finetune(train, items, cfg, TextConfig(), tmp_path, progress=False)
    encoder = TextEncoder.load(result.encoder_dir, precision=precision)
    full = encoder.encode(item_texts(items, TextConfig()), batch_size=cfg.embed_batch_size)
    np.testing.assert_allclose(result.item_embeddings, full, atol=atol)
    assert result.trainable_layers == 1 and result.state_cache_bytes > 0


def test_partial_finetune_trains_only_the_top_layers(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=30)
    train, _ = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, max_steps=3, tower_refit_steps=0, trainable_layers=1)
    result = finetune(train, items, cfg, TextConfig(), tmp_path, progress=False)
    trained = TextEncoder.load(result.encoder_dir, precision="fp32").model.state_dict()
    initial = TextEncoder.load(tiny_bert_dir, precision="fp32").model.state_dict()
    frozen = [k for k in initial if k.startswith(("embeddings.", "encoder.layer.0."))]
    top = [k for k in initial if k.startswith("encoder.layer.1.")]
    assert frozen and all(torch.equal(trained[k], initial[k]) for k in frozen)
    assert any(not torch.equal(trained[k], initial[k]) for k in top)


def test_partial_finetune_improves_validation_recall(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset()
    train, valid = split(inter, 4)
    cfg = small_cfg(tiny_bert_dir, trainable_layers=1, lr=1e-3)
    result = finetune(train, items, cfg, TextConfig(), tmp_path, valid=valid, progress=False)
    assert np.mean(result.history.losses[-5:]) < np.mean(result.history.losses[:5])
    assert result.valid_recall_before is not None and result.valid_recall_after is not None
    assert result.valid_recall_after > result.valid_recall_before + 0.2


def test_partial_finetune_resumes_from_the_last_checkpoint(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=40)
    train, _ = split(inter, 4)
    first = finetune(train, items, small_cfg(tiny_bert_dir, max_steps=4, tower_refit_steps=0, trainable_layers=1),
                     TextConfig(), tmp_path, progress=False)  # fmt: skip
    resumed = finetune(train, items, small_cfg(tiny_bert_dir, max_steps=6, tower_refit_steps=0, trainable_layers=1),
                       TextConfig(), tmp_path, progress=False, resume=True)  # fmt: skip
    assert resumed.history.losses[:4] == first.history.losses and resumed.steps == 6
    np.testing.assert_array_equal(resumed.raw_item_embeddings, first.raw_item_embeddings)


def test_zero_trainable_layers_is_a_clear_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    inter, items = cycle_dataset(n_users=10)
    with pytest.raises(FinetuneError, match="trainable_layers must be >= 1"):
        finetune(
            inter, items, small_cfg(tiny_bert_dir, trainable_layers=0), TextConfig(), tmp_path, progress=False
        )


# ----------------------------------------------------------------------------- DDP


def write_canonical(folder: Path) -> None:
    inter, items = cycle_dataset(n_users=40)
    folder.mkdir(parents=True, exist_ok=True)
    inter.drop("weight").write_parquet(folder / "interactions.parquet")
    items.write_parquet(folder / "items.parquet")


@pytest.mark.slow  # 15-35 s each: three interpreters import torch + transformers on a shared CPU
@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_ddp_two_processes_end_with_identical_weights(
    tiny_bert_dir: Path, tmp_path: Path, trainable_layers: int | None
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    write_canonical(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.finetune", "--data", str(data), "--out", str(out), "--model-dir", str(tiny_bert_dir),
           "--max-steps", "3", "--batch-size", "8", "--history-len", "4", "--valid-days", "0", "--lr", "1e-3",
           "--tower-refit-steps", "5", "--precision", "fp32", "--rank-checksums", "--no-progress"]  # fmt: skip
    if trainable_layers is not None:
        cmd += ["--trainable-layers", str(trainable_layers)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = (out / "checksum-rank0.txt").read_text()
    rank1 = (out / "checksum-rank1.txt").read_text()
    assert rank0 == rank1 and len(rank0.split()) == 2
    trained = TextEncoder.load(out / "encoder", precision="fp32").model.state_dict()
    initial = TextEncoder.load(tiny_bert_dir, precision="fp32").model.state_dict()
    embeddings_moved = not torch.equal(
        trained["embeddings.word_embeddings.weight"], initial["embeddings.word_embeddings.weight"]
    )
    top = [k for k in initial if k.startswith("encoder.layer.1.")]
    assert embeddings_moved == (trainable_layers is None)
    assert any(not torch.equal(trained[k], initial[k]) for k in top)
    assert (out / "user_tower.npz").is_file()


def test_cli_reports_bad_data_folder_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.finetune", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
