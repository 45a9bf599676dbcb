"""Quality beyond perplexity: does the compiled model still *behave* like the dense one?

Perplexity averages over easy tokens and can stay close while hard behaviour breaks (the "Junk DNA"
study: pruning hurts hard tasks first). So, against the dense model on held-out text:
- causal LMs: next-token top-1 agreement (same argmax on every scored token of the perplexity pass)
  and greedy-continuation agreement (from held-out prompts, greedy-decode `tokens` new tokens with
  each model: the share of the continuation both produce identically before they first diverge,
  and the position-wise token agreement);
- encoders: nearest-neighbour retrieval overlap (for each text, its k nearest texts by embedding
  cosine under each model; the mean share of the dense neighbours the compiled model also finds).

The dense side of each figure is cached on disk per source weights + data + settings
(`${SPARSEC_HOME:-~/.cache/sparsec}/eval/`), so evaluating many artifacts of one model computes it once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compiler.ir import state_dict_sha256

CACHE_VERSION = 2  # 2: the key covers the scored token ids / texts + vocabulary


def prompts_from_ids(ids: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens, evenly spaced through the held-out token stream."""
    if ids.numel() < length + 1 or count <= 0:
        return []
    starts = torch.linspace(0, ids.numel() - length - 1, count).long().unique().tolist()
    return [ids[s : s + length] for s in starts]


def greedy_continuation(module: nn.Module, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy decoding with the KV cache: the `tokens` ids the model picks after `prompt` (1-D)."""
    from compiler.cache_api import cache_kwargs, output_cache

    out: list[int] = []
    with torch.no_grad():
        res = module(input_ids=prompt.unsqueeze(0), use_cache=True)
        past = output_cache(res)
        nxt = int(res.logits[0, -1].argmax())
        for _ in range(tokens):
            out.append(nxt)
            if len(out) == tokens:
                break
            res = module(input_ids=torch.tensor([[nxt]]), use_cache=True, **cache_kwargs(module, past))
            past = output_cache(res)
            nxt = int(res.logits[0, -1].argmax())
    return torch.tensor(out, dtype=torch.long)


def greedy_agreement(dense: list[torch.Tensor], compiled: list[torch.Tensor]) -> dict[str, float]:
    """Mean share of each continuation identical up to the first divergence, and position-wise."""
    prefix, same = [], []
    for a, b in zip(dense, compiled):
        eq = (a == b).tolist()
        first_diff = eq.index(False) if False in eq else len(eq)
        prefix.append(first_diff / max(len(eq), 1))
        same.append(sum(eq) / max(len(eq), 1))
    n = max(len(prefix), 1)
    return {"greedy_prefix_match": sum(prefix) / n, "greedy_token_agreement": sum(same) / n}


def top1_agreement(dense_top1: torch.Tensor, compiled_top1: torch.Tensor) -> float:
    return float((dense_top1 == compiled_top1).float().mean()) if dense_top1.numel() else 0.0


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k nearest other rows by cosine: (n, k)."""
    x = F.normalize(emb.float(), dim=-1)
    sim = x @ x.t()
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(min(k, max(emb.shape[0] - 1, 1)), dim=1).indices


def retrieval_overlap(dense_nn: torch.Tensor, compiled_emb: torch.Tensor, k: int) -> float:
    """Mean over texts of |dense neighbours ∩ compiled neighbours| / k."""
    comp = neighbours(compiled_emb, k)
    hits = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(dense_nn, comp)]
    return sum(hits) / max(len(hits), 1)


# -- the dense side, cached -------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEC_HOME") or Path.home() / ".cache" / "sparsec").expanduser() / "eval"


def inputs_digest(ids: torch.Tensor | None, texts: list[str], tokenizer: Any) -> str:
    """What an evaluation scores: the token ids (causal LMs), else the texts and the tokenizer's vocabulary."""
    h = hashlib.sha256()
    if ids is not None:
        h.update(ids.to(torch.int64).numpy().tobytes())
    else:
        h.update("\x00".join(texts).encode())
        vocab = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else {}
        h.update(json.dumps(sorted(vocab.items())).encode())
    return h.hexdigest()[:16]


def cache_key(module: nn.Module, data: str, settings: dict[str, Any]) -> str:
    spec = json.dumps({"v": CACHE_VERSION, "weights": state_dict_sha256(module), "data": data, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


def load_cached(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
        return None


def store_cached(key: str, value: dict[str, Any]) -> None:
    path = cache_dir() / f"{key}.pt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs the cache
        pass
