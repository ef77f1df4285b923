"""A tiny random BERT checkpoint on disk, so tests exercise the real HF loading path in milliseconds.

Usage in a test module::

    from tests.helpers.tiny_bert import tiny_bert_dir_fixture  # noqa: F401  (registers `tiny_bert_dir`)

    def test_x(tiny_bert_dir): TextEncoder.load(tiny_bert_dir, precision="fp32")

(Importing it as `tiny_bert_dir` works too, but ruff then flags the test arguments as F811.)
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORD_LINES = """
a an and the of for with in on to by from is it this that no
running shoes trail sneakers espresso coffee beans tea mug cup book novel jacket shirt dress
trousers jeans sock socks hat cap bag phone case laptop lamp chair table sofa red blue green
black white grey pink yellow brown dark light men women kids baby sport sports garden kitchen
home office outdoor indoor wool cotton leather denim silk soft warm summer winter classic
slim fit loose category brand type group colour color department section description title
item product nike adidas acme zeta alpha beta gamma delta topic genre music film game toy
"""
WORDS = _WORD_LINES.split()


def vocabulary() -> list[str]:
    """Special tokens, whole words, then single letters/digits and their ## pieces (no [UNK] for ASCII)."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    seen: dict[str, None] = {}
    for token in SPECIAL_TOKENS + WORDS + chars + pieces:
        seen.setdefault(token, None)
    return list(seen)


def make_tiny_bert(
    directory: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0
) -> Path:
    """Write a random BERT (config + safetensors + fast tokenizer) to `directory` and return it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocabulary()) + "\n", encoding="utf-8")
    config = BertConfig(
        vocab_size=len(vocabulary()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(out))
    BertTokenizerFast(str(vocab_file), do_lower_case=True).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session", name="tiny_bert_dir")
def tiny_bert_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide tiny BERT directory (treat as read-only; copy it before modifying)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


tiny_bert_dir = tiny_bert_dir_fixture  # the same fixture under its own name, for `import tiny_bert_dir`
