from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsvc.encoder import (
    EncoderError,
    TextEncoder,
    cpu_supports_bf16,
    default_model_dir,
    mean_pool,
    resolve_precision,
)
from tests.helpers.tiny_bert import tiny_bert_dir_fixture  # noqa: F401  (pytest fixture)

TEXTS = [
    "running shoes",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z espresso coffee beans",
    "wool jacket",
    "blue",
    "soft cotton shirt for summer",
]


def test_encode_returns_unit_float32_rows_of_model_dim(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    emb = encoder.encode(TEXTS, batch_size=2)
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), encoder.dim) == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_length_sorted_batches_equal_one_text_at_a_time(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    batched = encoder.encode(TEXTS, batch_size=3)
    single = np.stack([encoder.encode([t], batch_size=1)[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_encode_of_no_texts_is_an_empty_matrix(tiny_bert_dir: Path) -> None:
    assert TextEncoder.load(tiny_bert_dir, precision="fp32").encode([]).shape == (0, 32)


def test_mean_pool_ignores_padding_tokens() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 0.0]]))


def test_bf16_embeddings_stay_close_to_fp32(tiny_bert_dir: Path) -> None:
    fp32 = TextEncoder.load(tiny_bert_dir, precision="fp32").encode(TEXTS)
    bf16_encoder = TextEncoder.load(tiny_bert_dir, precision="bf16")
    cosine = (fp32 * bf16_encoder.encode(TEXTS)).sum(axis=1)
    assert cosine.min() > 0.98


def test_save_then_load_gives_identical_embeddings(tiny_bert_dir: Path, tmp_path: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    reloaded = TextEncoder.load(encoder.save(tmp_path / "enc"), precision="fp32")
    np.testing.assert_allclose(reloaded.encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)


def test_embed_batch_carries_gradients(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    out = encoder.embed_batch(encoder.tokenize(["running shoes", "wool jacket"]))
    out.sum().backward()
    grads = [p.grad for p in encoder.model.embeddings.parameters()]
    assert out.requires_grad and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_max_tokens_truncates_long_texts(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32", max_tokens=8)
    assert max(len(ids) for ids in encoder.token_ids(TEXTS)) == 8


def test_directory_without_config_is_rejected_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(EncoderError, match=f"{tmp_path}.*not a BERT checkpoint"):
        TextEncoder.load(tmp_path)


def test_missing_directory_is_rejected_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="does not exist"):
        TextEncoder.load(tmp_path / "missing")


def test_broken_checkpoint_is_rejected_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(EncoderError, match=str(tmp_path)):
        TextEncoder.load(tmp_path)


def test_unknown_precision_and_fp16_on_cpu_are_rejected() -> None:
    with pytest.raises(EncoderError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(EncoderError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_auto_precision_on_cpu_follows_native_bf16_support() -> None:
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_supports_bf16() else "fp32")


def test_real_minilm_ranks_related_products_above_unrelated_ones() -> None:
    encoder = TextEncoder.load(precision="fp32")
    assert encoder.model_dir == default_model_dir() and encoder.dim == 384
    shoes, sneakers, coffee = encoder.encode(
        ["running shoes", "trail running sneakers", "espresso coffee beans"]
    )
    assert shoes @ sneakers > shoes @ coffee + 0.3


# ----------------------------------------------------------------------------- cached layer states


def test_encode_with_states_returns_exactly_what_encode_returns(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    emb, states = encoder.encode_with_states(TEXTS, layer=1, batch_size=2)
    np.testing.assert_array_equal(emb, encoder.encode(TEXTS, batch_size=2))
    assert states.hidden.shape == (len(TEXTS), int(states.lengths.max()), encoder.dim)


def test_states_are_zero_beyond_each_text_length(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    _, states = encoder.encode_with_states(TEXTS, layer=1, batch_size=5)
    shortest = int(states.lengths.argmin())
    n = int(states.lengths[shortest])
    assert torch.count_nonzero(states.hidden[shortest, n:]) == 0
    assert torch.count_nonzero(states.hidden[shortest, :n]) > 0


@pytest.mark.parametrize("layer", [0, 1])
def test_encode_states_equals_a_full_forward_in_fp32(tiny_bert_dir: Path, layer: int) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    _, states = encoder.encode_with_states(TEXTS, layer=layer, batch_size=2)
    with torch.no_grad():  # change the layers above: the cached states stay valid, outputs move
        for p in encoder.model.encoder.layer[layer:].parameters():
            p.add_(0.05 * torch.randn_like(p))
    np.testing.assert_allclose(
        encoder.encode_states(states, batch_size=2), encoder.encode(TEXTS, batch_size=2), atol=1e-6
    )


def test_encode_states_of_a_row_subset_follows_the_rows(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    full, states = encoder.encode_with_states(TEXTS, layer=1, batch_size=2)
    rows = np.array([4, 1, 3])
    np.testing.assert_allclose(encoder.encode_states(states, rows, batch_size=2), full[rows], atol=1e-6)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="no native bf16 on this CPU")
def test_bf16_states_match_a_full_forward_within_bf16_tolerance(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="bf16")
    emb, states = encoder.encode_with_states(TEXTS, layer=1, batch_size=2)
    assert states.hidden.dtype == torch.bfloat16
    np.testing.assert_allclose(encoder.encode_states(states, batch_size=2), emb, atol=2e-2)


def test_encode_with_states_rejects_a_layer_outside_the_model(tiny_bert_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_bert_dir, precision="fp32")
    with pytest.raises(EncoderError, match="layer must be in"):
        encoder.encode_with_states(TEXTS, layer=2)
