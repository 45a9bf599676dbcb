"""Greedy token-by-token decode of a causal-LM graph with a KV cache — the pure loops.

Stdlib + numpy only: this module is also imported inside the DeepSparse virtualenv by
`runtimes/decode/worker_deepsparse.py`, so the engine and the loop live in one process and the cache
never crosses a pipe. The graph follows optimum's naming (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key/value` → `logits`, `present.{i}.key/value`).

Two cache strategies, same greedy tokens:
- **dynamic** (`greedy_dynamic`): the graph's `present.*` of one step is the next step's
  `past_key_values.*`; the past grows by one slot per token (onnxruntime, OpenVINO).
- **static** (`StaticKV`, `greedy_static`): for engines compiled for fixed shapes (DeepSparse). The
  prefill graph takes the (left-padded) prompt and a 1-slot dummy past (masked); the decode graph
  takes one token and a past of `slots` fixed slots. The attention mask marks which slots hold a
  token. Attention over cache slots does not depend on their order (RoPE/positions are already in
  the keys, `position_ids` are fed explicitly), so each new key/value is written into the next free
  slot in place: a step copies one slot per layer, never the whole cache.

Tokens/s counts decode steps only: generated token 1 comes from the prefill logits, tokens 2..N
from N-1 decode steps. Every step is timed whole (engine call + cache update + argmax), and the
process's resident set size is sampled after each step (`peak_rss_bytes` = the maximum while decoding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Run = Callable[[dict], dict]  # feeds by name -> outputs by name
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


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
    stopped: str = "length"  # "length" | "eos"

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


def _argmax_last(logits: np.ndarray) -> int:
    return int(np.argmax(logits[0, -1]))


def _check_batch1(ids: np.ndarray) -> None:
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"decode runs batch 1: prompt ids must have shape (1, n), got {ids.shape}")


# -- dynamic cache ---------------------------------------------------------------------------------
def greedy_dynamic(run: Run, past_names: list[str], empty_past: dict[str, np.ndarray], ids: np.ndarray,
                   mask: np.ndarray, new_tokens: int, stop_ids: tuple[int, ...] = (),
                   rss: Callable[[], int] = rss_bytes) -> DecodeTrace:
    """Greedy decode on a graph with a growing cache (`present` → next `past`)."""
    _check_batch1(ids)
    trace = DecodeTrace()
    mask = mask.astype(np.int64)
    start = time.perf_counter()
    out = run({"input_ids": ids.astype(np.int64), "attention_mask": mask,
               "position_ids": positions_from_mask(mask, ids.shape[1]), **empty_past})
    token = _argmax_last(out["logits"])
    trace.prefill_ms = (time.perf_counter() - start) * 1e3

    def step(token: int, position: int) -> np.ndarray:
        nonlocal out, mask
        past = {p: out[PRESENT_PREFIX + p[len(PAST_PREFIX):]] for p in past_names}
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        out = run({"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": mask,
                   "position_ids": np.array([[position]], dtype=np.int64), **past})
        return out["logits"]

    return _steps(trace, token, int(mask.sum()), new_tokens, stop_ids, step, rss)


def _steps(trace: DecodeTrace, token: int, position: int, new_tokens: int, stop_ids: tuple[int, ...],
           step: Callable[[int, int], np.ndarray], rss: Callable[[], int]) -> DecodeTrace:
    """The greedy loop after the prefill: `step(token, position)` feeds one token, returns its logits."""
    while True:
        trace.tokens.append(token)
        if token in stop_ids:
            trace.stopped = "eos"
            return trace
        if len(trace.tokens) >= new_tokens:
            return trace
        start = time.perf_counter()
        token = _argmax_last(step(token, position))
        position += 1
        trace.step_ms.append((time.perf_counter() - start) * 1e3)
        trace.peak_rss_bytes = max(trace.peak_rss_bytes, rss())


# -- static cache ----------------------------------------------------------------------------------
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


def greedy_static(prefill: Run, decode: Run, kv_shapes: dict[str, tuple[int, ...]], slots: int,
                  prefill_len: int, ids: np.ndarray, mask: np.ndarray, new_tokens: int,
                  stop_ids: tuple[int, ...] = (), pad_id: int = 0, dtype: str = "float32",
                  rss: Callable[[], int] = rss_bytes) -> DecodeTrace:
    """Greedy decode on fixed-shape graphs: `prefill` takes (1, prefill_len) tokens after a 1-slot
    dummy past; `decode` takes one token and a `slots`-slot past. `prefill` None: the prompt is fed
    token by token through `decode` (one engine only, prefill as slow as decoding)."""
    _check_batch1(ids)
    trace = DecodeTrace()
    cache = StaticKV(kv_shapes, slots, dtype)
    start = time.perf_counter()
    if prefill is not None:
        pids, pmask = left_pad(ids, mask, prefill_len, pad_id)
        out = prefill(static_prefill_feeds(pids, pmask, kv_shapes, dtype))
        cache.load_prefill(out, pmask)
        logits = out["logits"]
    else:
        logits = None
        for tok in ids[0][mask[0].astype(bool)]:
            out = decode(_decode_feeds(cache, int(tok), cache.next_slot))
            cache.append(out)
            logits = out["logits"]
    token = _argmax_last(logits)
    trace.prefill_ms = (time.perf_counter() - start) * 1e3

    def step(token: int, position: int) -> np.ndarray:
        out = decode(_decode_feeds(cache, token, position))
        cache.append(out)
        return out["logits"]

    return _steps(trace, token, int(mask.sum()), new_tokens, stop_ids, step, rss)


def _decode_feeds(cache: StaticKV, token: int, position: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": cache.step_mask(),
            "position_ids": np.array([[position]], dtype=np.int64), **cache.past}


def static_slots(prompt_len: int, new_tokens: int) -> int:
    """Past slots a decode graph needs: the prompt plus every generated token but the last."""
    return prompt_len + max(new_tokens - 1, 0)
