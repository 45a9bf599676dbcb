"""Token generation for causal-LM artifacts, batched, on any `infer(feeds) -> outputs` callable.

The lowered KV-cache graph follows optimum's naming: inputs `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key/value`; outputs `logits`, `present.{i}.key/value`.
A group of requests is prefilled together (prompts left-padded, masked), then decoded one token per
step; finished rows leave the batch (their cache rows are dropped). A graph without past inputs is
run on the whole sequence at every step (correct, slower).

Sampling: temperature 0 = greedy (argmax); otherwise softmax(logits / T) restricted to the top_p
nucleus, drawn from a per-request generator (seeded when the request gives a seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from runtimes.serve.text import pad_batch

Infer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class KVLayout:
    """Names and static dims of the cache inputs, read from the graph signature."""

    past_names: tuple[str, ...]  # past_key_values.{i}.key/value in graph order
    heads: dict[str, int]
    head_dim: dict[str, int]
    dtype: str
    has_position_ids: bool

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(n.replace("past_key_values.", "present.") for n in self.past_names)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenRequest:
    prompt: list[int]
    params: SamplingParams
    # called with each new token; returns False to finish the sequence now (stop string, client gone)
    on_token: Callable[[int], bool] = field(default=lambda token: True)


@dataclass(frozen=True)
class GenResult:
    tokens: tuple[int, ...]
    finish_reason: str  # "stop" (eos or a stop condition) | "length"


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a (vocab,) logits row."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < params.top_p
        trimmed = np.zeros_like(probs)
        trimmed[order[keep]] = probs[order[keep]]
        probs = trimmed / trimmed.sum()
    return int(rng.choice(len(probs), p=probs))


def generate(infer: Infer, layout: KVLayout | None, requests: list[GenRequest], pad_id: int,
             eos_ids: tuple[int, ...]) -> list[GenResult]:
    """Run the requests as one batch until each hits eos, its stop condition or max_tokens."""
    rngs = [np.random.default_rng(r.params.seed) for r in requests]
    tokens: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    active = list(range(len(requests)))
    ids, mask = pad_batch([r.prompt for r in requests], pad_id, left=True)
    state = _Prefill(ids, mask, layout)
    while active:
        logits = state.step(infer)  # (len(active), vocab) for the last position
        still = []
        for row, idx in enumerate(active):
            req = requests[idx]
            tok = sample(logits[row], req.params, rngs[idx])
            if tok in eos_ids:
                finish[idx] = "stop"
                continue
            tokens[idx].append(tok)
            if not req.on_token(tok):
                finish[idx] = "stop"
            elif len(tokens[idx]) >= req.params.max_tokens:
                finish[idx] = "length"
            else:
                still.append(row)
        active = [active[r] for r in still]
        if active:
            state.advance(still, [tokens[i][-1] for i in active])
    return [GenResult(tuple(t), f or "length") for t, f in zip(tokens, finish)]


class _Prefill:
    """The evolving batch: ids/mask of the rows still active, and their KV cache."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, layout: KVLayout | None):
        self.layout = layout
        self.mask = mask
        self.new_ids = ids  # tokens to feed this step
        self.all_ids = ids  # full sequences (graphs without cache)
        self.past: dict[str, np.ndarray] | None = None
        if layout is not None:
            b = ids.shape[0]
            self.past = {n: np.zeros((b, layout.heads[n], 0, layout.head_dim[n]), dtype=layout.dtype)
                         for n in layout.past_names}

    def step(self, infer: Infer) -> np.ndarray:
        if self.layout is None:
            feeds = {"input_ids": self.all_ids, "attention_mask": self.mask}
            out = infer(feeds)
            return out["logits"][:, -1, :]
        width = self.new_ids.shape[1]
        positions = np.clip(np.cumsum(self.mask, axis=1) - 1, 0, None)[:, -width:]
        feeds: dict[str, Any] = {"input_ids": self.new_ids, "attention_mask": self.mask, **self.past}
        if self.layout.has_position_ids:
            feeds["position_ids"] = positions.astype(np.int64)
        out = infer(feeds)
        self.past = {p: out[q] for p, q in zip(self.layout.past_names, self.layout.present_names)}
        return out["logits"][:, -1, :]

    def advance(self, keep_rows: list[int], next_tokens: list[int]) -> None:
        """Keep `keep_rows` of the batch and append one token to each."""
        rows = np.asarray(keep_rows, dtype=np.int64)
        new = np.asarray(next_tokens, dtype=np.int64)[:, None]
        self.mask = np.concatenate([self.mask[rows], np.ones_like(new)], axis=1)
        self.new_ids = new
        self.all_ids = np.concatenate([self.all_ids[rows], new], axis=1)
        if self.past is not None:
            self.past = {k: v[rows] for k, v in self.past.items()}
