"""Batched calibration forwards through one block: many samples in one call instead of one call each.

Why: per-sample block calls multiply small matrix products and Python overhead (a Wanda prune ran two
per-sample forwards per block and was nearly as slow as SparseGPT). Samples can share one call when
everything but the hidden state is identical across them — the block's other arguments (rotary
embeddings, a causal or all-ones mask, position ids) are captured with batch size 1 and broadcast over
the batch. Consecutive samples are grouped by that test, up to `max_tokens` tokens per call; the
runner checks once per run that a batched call reproduces per-sample calls, and otherwise keeps
calling per sample (see BlockRunner.check_batching).
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_MAX_TOKENS = 4096


def same_value(a: Any, b: Any) -> bool:
    """Deep equality of block call arguments (tensors compared by value)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable == (caches...) never batch
        return False


def batch_groups(hidden: list[torch.Tensor], args: list[tuple], kwargs: list[dict[str, Any]],
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> list[list[int]]:
    """Consecutive sample indices that can share one block call."""
    groups: list[list[int]] = []
    for i, h in enumerate(hidden):
        if groups:
            head = groups[-1][0]
            g = groups[-1]
            tokens = sum(int(hidden[j][0].numel() // hidden[j].shape[-1]) for j in g) + int(h[0].numel() // h.shape[-1])
            if (h.dim() >= 2 and h.shape[0] == 1 and h.shape == hidden[head].shape and tokens <= max_tokens
                    and same_value(args[i], args[head]) and same_value(kwargs[i], kwargs[head])):
                g.append(i)
                continue
        groups.append([i])
    return groups


def stacked_call(hidden: list[torch.Tensor], args: list[tuple], kwargs: list[dict[str, Any]], hidden_pos: int | str,
                 group: list[int]) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) for one block call on the samples of `group`, hidden states concatenated on dim 0."""
    head = group[0]
    call_args, call_kwargs = list(args[head]), dict(kwargs[head])
    h = hidden[head] if len(group) == 1 else torch.cat([hidden[i] for i in group], dim=0)
    if isinstance(hidden_pos, int):
        call_args[0] = h
    else:
        call_kwargs[hidden_pos] = h
    return call_args, call_kwargs
