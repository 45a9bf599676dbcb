"""Text side of the server: tokenizer and limits read from the artifact's `model/` directory,
padding of a batch, pooling of encoder states into sentence embeddings, incremental detokenising.

Pure numpy/tokenizer code; nothing here knows about HTTP or backends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ArtifactError

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


@dataclass(frozen=True)
class Pooling:
    """How token states become one embedding (sentence-transformers `1_Pooling/config.json`)."""

    mode: str = "mean"
    normalize: bool = True


@dataclass(frozen=True)
class TextModel:
    """The tokenizer and the limits of the served model."""

    tokenizer: Any
    max_positions: int  # model config: the longest sequence (prompt + generated) the model accepts
    limit_source: str  # where max_positions came from, quoted in 400 messages
    vocab_size: int
    pad_id: int
    eos_ids: tuple[int, ...]
    pooling: Pooling
    fast: Any = None  # the fast tokenizer's Rust backend, truncation and padding off (half the per-call cost)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens, no truncation (limits are checked by the caller)."""
        if self.fast is not None:
            return [enc.ids for enc in self.fast.encode_batch(texts, add_special_tokens=True)]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_text_model(model_dir: Path) -> TextModel:
    """Tokenizer, position limit, pad/eos ids and pooling of the HF directory `model_dir`."""
    from transformers import AutoConfig, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ArtifactError(f"'{model_dir}' has no config.json: the server needs the artifact's Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the tokenizer from '{model_dir}': {exc}") from None
    config = AutoConfig.from_pretrained(model_dir)
    max_positions = getattr(config, "max_position_embeddings", None)
    source = "max_position_embeddings in the model config"
    if not isinstance(max_positions, int) or max_positions <= 0:
        max_positions, source = int(min(tokenizer.model_max_length, 1 << 20)), "the tokenizer's model_max_length"
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(config, "pad_token_id", None)
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    if not eos_ids and tokenizer.eos_token_id is not None:
        eos_ids = (tokenizer.eos_token_id,)
    vocab = int(getattr(config, "vocab_size", None) or len(tokenizer))
    return TextModel(tokenizer, int(max_positions), source, vocab, int(pad_id), tuple(int(e) for e in eos_ids),
                     read_pooling(model_dir), _plain_backend(tokenizer))


def _plain_backend(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer's backend without the truncation/padding saved in tokenizer.json."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def read_pooling(model_dir: Path) -> Pooling:
    """Pooling from a sentence-transformers layout; mean + L2 normalisation when there is none."""
    mode = "mean"
    cfg_path = model_dir / "1_Pooling" / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        flags = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                 "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "mean": "pooling_mode_mean_tokens"}
        chosen = [m for m, key in flags.items() if cfg.get(key)]
        if len(chosen) > 1:
            raise ArtifactError(f"{cfg_path}: several pooling modes {chosen}; the server supports exactly one")
        mode = chosen[0] if chosen else "mean"
    normalize = True
    modules_path = model_dir / "modules.json"
    if modules_path.is_file():
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return Pooling(mode, normalize)


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False,
              shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 arrays padded to the longest sequence of the batch, or to a
    static (rows, width); filler rows attend to their first position only (no fully masked row)."""
    rows, width = shape or (len(seqs), max(len(s) for s in seqs))
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    mask[len(seqs):, 0] = 1
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    return ids, mask


def length_buckets(lengths: list[int], max_waste: float = 0.25, slack_tokens: int = 64) -> list[list[int]]:
    """Indices grouped so that each group, padded to its longest member, wastes at most `max_waste` of
    its real tokens (or `slack_tokens`, whichever is more): similar lengths share one backend call,
    a 10-token text is not padded to 200 because a long one arrived in the same batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            width = lengths[i]  # ascending: the newcomer is the longest
            padded = width * (len(groups[-1]) + 1)
            if padded - (real + width) <= max(max_waste * (real + width), slack_tokens):
                groups[-1].append(i)
                real += width
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """(batch, seq, dim) token states and (batch, seq) mask -> (batch, dim) float32 embeddings."""
    hidden = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]
    if pooling.mode == "cls":
        out = hidden[:, 0, :]
    elif pooling.mode == "max":
        out = np.where(m > 0, hidden, -np.inf).max(axis=1)
    else:
        summed = (hidden * m).sum(axis=1)
        counts = np.clip(m.sum(axis=1), 1e-9, None)
        out = summed / (np.sqrt(counts) if pooling.mode == "mean_sqrt_len" else counts)
    return l2_normalize(out) if pooling.normalize else out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.clip(norms, 1e-12, None)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas; holds back an incomplete UTF-8 character."""

    def __init__(self, text_model: TextModel):
        self._text_model = text_model
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._text_model.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta

    @property
    def text(self) -> str:
        return self._text_model.decode(self._ids)
