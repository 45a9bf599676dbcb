"""The one generation loop of a causal-LM graph with a KV cache, and its two cache strategies.

Stdlib + numpy only: this module is also imported inside the DeepSparse virtualenv by
`runtimes/decode/deepsparse_loop_server.py`, so the engine and the loop live in one process and the cache
never crosses a pipe. The graph follows optimum's naming (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key/value` → `logits`, `present.{i}.key/value`).

`generate(cache, requests, eos_ids)` is the loop every caller uses — `verify --decode` and
`bench --decode` (one greedy request, `greedy()`), the server's completions (a batch of requests with
sampling, stop callbacks, streaming), and the DeepSparse worker. A cache strategy feeds the graph:
- **dynamic** (`DynamicCache`): the graph's `present.*` of one step is the next step's
  `past_key_values.*`; the past grows by one slot per token; a batch of left-padded prompts is
  prefilled together and finished rows leave the batch (onnxruntime, OpenVINO; a graph without past
  inputs is rerun on the whole sequence each step: correct, slower).
- **static** (`StaticCache`, `StaticKV`): for engines compiled for fixed shapes (DeepSparse), batch 1.
  The prefill graph takes the (left-padded) prompt and a 1-slot dummy past (masked); the decode graph
  takes one token and a past of `slots` fixed slots. The attention mask marks which slots hold a
  token. Attention over cache slots does not depend on their order (RoPE/positions are already in
  the keys, `position_ids` are fed explicitly), so each new key/value is written into the next free
  slot in place: a step copies one slot per layer, never the whole cache.

Sampling: temperature 0 = greedy (argmax); otherwise softmax(logits / T) restricted to the top_p
nucleus, drawn from a per-request generator (seeded when the request gives a seed).
Tokens/s counts decode steps only: generated token 1 comes from the prefill logits, tokens 2..N
from N-1 decode steps. Every step is timed whole (engine call + cache update + token choice), and the
process's resident set size is sampled after each step (`peak_rss_bytes` = the maximum while decoding).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

Run = Callable[[dict], dict]  # feeds by name -> outputs by name
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size (VmRSS) of a process, 0 where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class DecodeTrace:
    """What one greedy generation did: tokens, prefill time, per-step times, RSS while decoding."""

    tokens: list[int] = field(default_factory=list)
    prefill_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    stopped: str = "length"  # "length" | "eos" | "stop" (the request's callback ended it)

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "prefill_ms": self.prefill_ms, "step_ms": list(self.step_ms),
                "peak_rss_bytes": self.peak_rss_bytes, "stopped": self.stopped}


def positions_from_mask(mask: np.ndarray, width: int) -> np.ndarray:
    """position_ids of the last `width` tokens from a (batch, total) 0/1 mask (left padding works)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -width:].astype(np.int64)


def left_pad(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(1, n) prompt → (1, length), padding (masked) on the left."""
    n = ids.shape[1]
    if n > length:
        raise ValueError(f"prompt of {n} tokens is longer than the static prefill length {length}")
    pad = length - n
    ids = np.concatenate([np.full((ids.shape[0], pad), pad_id, dtype=np.int64), ids.astype(np.int64)], axis=1)
    mask = np.concatenate([np.zeros((mask.shape[0], pad), dtype=np.int64), mask.astype(np.int64)], axis=1)
    return ids, mask


# -- requests and sampling ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def to_dict(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


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


def left_pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64, every prompt left-padded (masked) to the longest."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


# -- the loop ----------------------------------------------------------------------------------------
class Cache(Protocol):
    """A cache strategy: feeds the graph, keeps the KV cache, returns last-position logits (rows, vocab)."""

    def prefill(self) -> np.ndarray: ...

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray: ...


def generate(cache: Cache, requests: list[GenRequest], eos_ids: tuple[int, ...] = (),
             rss: Callable[[], int] = rss_bytes) -> tuple[list[GenResult], DecodeTrace]:
    """Run the requests (the rows of `cache`, in order) until each hits eos, its callback's stop or
    max_tokens. The trace times the prefill and every decode step of the batch; its `tokens` and
    `stopped` are request 0's, with the eos token kept (the greedy API's view)."""
    rngs = [np.random.default_rng(r.params.seed) for r in requests]
    tokens: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    eos_hit: list[int | None] = [None] * len(requests)
    trace = DecodeTrace()
    active = list(range(len(requests)))
    start = time.perf_counter()
    logits = cache.prefill()
    first = True
    while True:
        still = []
        for row, idx in enumerate(active):
            req = requests[idx]
            tok = sample(logits[row], req.params, rngs[idx])
            if tok in eos_ids:
                finish[idx], eos_hit[idx] = "stop", tok
                continue
            tokens[idx].append(tok)
            if not req.on_token(tok):
                finish[idx] = "stop"
            elif len(tokens[idx]) >= req.params.max_tokens:
                finish[idx] = "length"
            else:
                still.append(row)
        elapsed = (time.perf_counter() - start) * 1e3
        if first:
            trace.prefill_ms, first = elapsed, False
        else:
            trace.step_ms.append(elapsed)
            trace.peak_rss_bytes = max(trace.peak_rss_bytes, rss())
        active = [active[r] for r in still]
        if not active:
            break
        start = time.perf_counter()
        logits = cache.step(still, [tokens[i][-1] for i in active])
    trace.tokens = tokens[0] + ([eos_hit[0]] if eos_hit[0] is not None else [])
    trace.stopped = "eos" if eos_hit[0] is not None else ("length" if finish[0] == "length" else "stop")
    return [GenResult(tuple(t), f or "length") for t, f in zip(tokens, finish)], trace


def greedy(cache: Cache, new_tokens: int, stop_ids: tuple[int, ...] = (),
           rss: Callable[[], int] = rss_bytes) -> DecodeTrace:
    """One greedy request of `new_tokens` tokens (stopping at a stop id, which the trace keeps)."""
    return generate(cache, [GenRequest([], SamplingParams(max_tokens=new_tokens))], tuple(stop_ids), rss)[1]


# -- dynamic cache -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVLayout:
    """Names and static dims of the cache inputs (from the graph signature or the manifest's `kv`)."""

    past_names: tuple[str, ...]  # past_key_values.{i}.key/value in graph order
    heads: dict[str, int]
    head_dim: dict[str, int]
    dtype: str
    has_position_ids: bool

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(n.replace(PAST_PREFIX, PRESENT_PREFIX) for n in self.past_names)


class DynamicCache:
    """The evolving batch on a growing cache: ids/mask of the rows still active, and their KV cache.
    `layout` None: a graph without past inputs, rerun on the whole sequence every step."""

    def __init__(self, run: Run, layout: KVLayout | None, ids: np.ndarray, mask: np.ndarray):
        self.run = run
        self.layout = layout
        self.mask = mask.astype(np.int64)
        self.new_ids = ids.astype(np.int64)  # tokens to feed this step
        self.all_ids = self.new_ids  # full sequences (graphs without cache)
        self.past: dict[str, np.ndarray] | None = None
        if layout is not None:
            b = ids.shape[0]
            self.past = {n: np.zeros((b, layout.heads[n], 0, layout.head_dim[n]), dtype=layout.dtype)
                         for n in layout.past_names}

    def prefill(self) -> np.ndarray:
        return self._call()

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray:
        rows = np.asarray(keep_rows, dtype=np.int64)
        new = np.asarray(tokens, dtype=np.int64)[:, None]
        self.mask = np.concatenate([self.mask[rows], np.ones_like(new)], axis=1)
        self.new_ids = new
        self.all_ids = np.concatenate([self.all_ids[rows], new], axis=1)
        if self.past is not None:
            self.past = {k: v[rows] for k, v in self.past.items()}
        return self._call()

    def _call(self) -> np.ndarray:
        if self.layout is None:
            return self.run({"input_ids": self.all_ids, "attention_mask": self.mask})["logits"][:, -1, :]
        feeds: dict[str, Any] = {"input_ids": self.new_ids, "attention_mask": self.mask, **self.past}
        if self.layout.has_position_ids:
            feeds["position_ids"] = positions_from_mask(self.mask, self.new_ids.shape[1])
        out = self.run(feeds)
        self.past = {p: out[q] for p, q in zip(self.layout.past_names, self.layout.present_names)}
        return out["logits"][:, -1, :]


# -- static cache --------------------------------------------------------------------------------------
class StaticKV:
    """A fixed-size KV cache of `slots` slots per tensor and the mask of which slots hold a token.

    Shapes: past tensors (1, kv_heads, slots, head_dim); the decode graph's attention mask has
    `slots + 1` entries (the past slots, then the token being fed)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], slots: int, dtype: str = "float32"):
        self.names = list(shapes)
        self.slots = slots
        self.past = {n: np.zeros((1, shapes[n][1], slots, shapes[n][3]), dtype=dtype) for n in self.names}
        self.filled = np.zeros((1, slots), dtype=np.int64)
        self.next_slot = 0

    def load_prefill(self, outputs: dict, prompt_mask: np.ndarray, dummy: int = 1) -> None:
        """Copy the prefill's `present.*` (its first `dummy` slots are the dummy past) into slots 0..P-1."""
        width = prompt_mask.shape[1]
        if width > self.slots:
            raise ValueError(f"a {width}-token prompt does not fit a {self.slots}-slot cache")
        for name in self.names:
            present = outputs[PRESENT_PREFIX + name[len(PAST_PREFIX):]]
            self.past[name][:, :, :width, :] = present[:, :, dummy:dummy + width, :]
        self.filled[:, :width] = prompt_mask
        self.filled[:, width:] = 0
        self.next_slot = width

    def step_mask(self) -> np.ndarray:
        return np.concatenate([self.filled, np.ones((1, 1), dtype=np.int64)], axis=1)

    def append(self, outputs: dict) -> None:
        """Write the fed token's key/value (the last slot of each `present.*`) into the next free slot."""
        if self.next_slot >= self.slots:
            raise ValueError(f"the static KV cache is full ({self.slots} slots): compile it for more tokens")
        s = self.next_slot
        for name in self.names:
            self.past[name][:, :, s, :] = outputs[PRESENT_PREFIX + name[len(PAST_PREFIX):]][:, :, -1, :]
        self.filled[0, s] = 1
        self.next_slot = s + 1


def static_prefill_feeds(ids: np.ndarray, mask: np.ndarray, kv_shapes: dict[str, tuple[int, ...]],
                         dtype: str = "float32", dummy: int = 1) -> dict[str, np.ndarray]:
    """Feeds of the static prefill graph: the (already left-padded) prompt after `dummy` masked past slots."""
    full = np.concatenate([np.zeros((1, dummy), dtype=np.int64), mask.astype(np.int64)], axis=1)
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": full,
             "position_ids": positions_from_mask(full, ids.shape[1])}
    feeds.update({n: np.zeros((1, s[1], dummy, s[3]), dtype=dtype) for n, s in kv_shapes.items()})
    return feeds


class StaticCache:
    """Batch-1 decoding on fixed-shape graphs: `prefill` takes (1, prefill_len) tokens after a 1-slot
    dummy past; `decode` takes one token and a `slots`-slot past. `prefill` None: the prompt is fed
    token by token through `decode` (one engine only, prefill as slow as decoding)."""

    def __init__(self, prefill: Run | None, decode: Run, kv_shapes: dict[str, tuple[int, ...]], slots: int,
                 prefill_len: int, ids: np.ndarray, mask: np.ndarray, pad_id: int = 0, dtype: str = "float32"):
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"decode runs batch 1: prompt ids must have shape (1, n), got {ids.shape}")
        self.prefill_run, self.decode = prefill, decode
        self.kv_shapes, self.prefill_len, self.pad_id, self.dtype = kv_shapes, prefill_len, pad_id, dtype
        self.cache = StaticKV(kv_shapes, slots, dtype)
        self.ids, self.mask = ids, mask
        self.position = int(mask.sum())

    def prefill(self) -> np.ndarray:
        if self.prefill_run is not None:
            pids, pmask = left_pad(self.ids, self.mask, self.prefill_len, self.pad_id)
            out = self.prefill_run(static_prefill_feeds(pids, pmask, self.kv_shapes, self.dtype))
            self.cache.load_prefill(out, pmask)
            return out["logits"][:, -1, :]
        logits = None
        for tok in self.ids[0][self.mask[0].astype(bool)]:
            out = self.decode(self._feeds(int(tok), self.cache.next_slot))
            self.cache.append(out)
            logits = out["logits"]
        return logits[:, -1, :]

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray:
        out = self.decode(self._feeds(tokens[0], self.position))
        self.cache.append(out)
        self.position += 1
        return out["logits"][:, -1, :]

    def _feeds(self, token: int, position: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": self.cache.step_mask(),
                "position_ids": np.array([[position]], dtype=np.int64), **self.cache.past}


def static_slots(prompt_len: int, new_tokens: int) -> int:
    """Past slots a decode graph needs: the prompt plus every generated token but the last."""
    return prompt_len + max(new_tokens - 1, 0)
