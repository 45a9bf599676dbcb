"""Numpy feeds for lowered graphs, built from a manifest's "lowering" section (pure numpy, no runtime).

Used by lowering's numerics check, verification, benchmarks and the server:
- `encoder_feeds(lowering, ids, mask)`: input_ids / attention_mask (+ zero token_type_ids);
- `lm_feeds(lowering, ids, mask, past)`: causal-LM step; `past=None` means an empty cache
  (prefill). `position_ids` come from the attention mask (left padding works), as optimum does;
- `text_batch(tokenizer, texts, batch_size, seqlen)`: real tokenized text padded to a fixed shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def kv_names(lowering: dict[str, Any]) -> list[str]:
    return [n for n in lowering["inputs"] if n.startswith("past_key_values.")]


def empty_past(lowering: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    kv = lowering["kv"]
    shape = (batch, kv["kv_heads"], 0, kv["head_dim"])
    return {n: np.zeros(shape, dtype=np.float32) for n in kv_names(lowering)}


def encoder_feeds(lowering: dict[str, Any], ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
    if "token_type_ids" in lowering["inputs"]:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds


def lm_feeds(lowering: dict[str, Any], ids: np.ndarray, mask: np.ndarray,
             past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One causal-LM step. `mask` covers past + new tokens; `past` maps past_key_values.* names."""
    ids = ids.astype(np.int64)
    mask = mask.astype(np.int64)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions.astype(np.int64)}
    feeds.update(past if past is not None else empty_past(lowering, ids.shape[0]))
    return feeds


def present_to_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """present.{i}.key/value outputs → past_key_values.{i}.key/value inputs of the next step."""
    return {"past_key_values." + n[len("present."):]: v for n, v in outputs.items() if n.startswith("present.")}


def graph_feeds(lowering: dict[str, Any], ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for one full-sequence call (encoder forward, or LM prefill with an empty cache)."""
    if lowering["task"] == "text-generation":
        return lm_feeds(lowering, ids, mask)
    return encoder_feeds(lowering, ids, mask)


def text_batch(tokenizer: Any, texts: list[str], batch_size: int, seqlen: int) -> tuple[np.ndarray, np.ndarray]:
    """`batch_size` texts tokenized, truncated and right-padded to exactly `seqlen` tokens; the texts
    cycle when there are fewer than `batch_size`."""
    chosen = [texts[i % len(texts)] for i in range(batch_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = np.full((batch_size, seqlen), pad_id, dtype=np.int64)
    mask = np.zeros((batch_size, seqlen), dtype=np.int64)
    for row, text in enumerate(chosen):
        tokens = tokenizer(text, truncation=True, max_length=seqlen)["input_ids"][:seqlen]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


def long_texts(texts: list[str], min_chars: int) -> list[str]:
    """Join consecutive texts until each chunk has at least `min_chars` characters, so fixed-length
    batches are mostly real tokens rather than padding."""
    out, cur = [], ""
    for t in texts:
        cur = f"{cur}\n\n{t}" if cur else t
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
    return out or ([cur] if cur else [])
