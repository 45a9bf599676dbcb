"""onnxruntime decoding on the fused graph (`decode_gqa.onnx`, compiler/lowering/gqa.py): the KV cache is
one buffer per tensor, sized for prompt + new tokens, that GroupQueryAttention appends to in place.

The graph's `past_key_values.{i}.*` input and its `present.{i}.*` output are bound (IOBinding) to the
*same* OrtValue — onnxruntime-genai's "past_present_share_buffer" — so a step writes one slot per layer
and copies nothing; the positions come from the attention mask inside the graph. What crosses the
Python boundary per step is the new token, a mask of ones and the logits.

Batch 1 by construction (GroupQueryAttention computes rotary positions from the valid length, so a
padded prompt would be rotated wrongly): `run` strips a left-padded prompt to its tokens, the server's
`complete` sends one request per call (`batched = False`), `prefill_logits` runs row by row and leaves
zeros at padded positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import SparsecError
from compiler.lowering.feeds import kv_names
from runtimes.base import RunnerOptions
from runtimes.decode.decoders import DecodeOptions, Decoder
from runtimes.decode.loop import DecodeTrace, GenRequest, GenResult, generate, rss_bytes


class InPlaceCache:
    """`loop.Cache` on the fused graph: one request, a preallocated cache that the graph updates in place."""

    def __init__(self, session: Any, past: tuple[str, ...], kv_shape: tuple[int, int], ids: np.ndarray,
                 capacity: int):
        import onnxruntime as ort

        self.session = session
        self.tokens = int(ids.shape[1])
        self.ids = ids.astype(np.int64)
        self.binding = session.io_binding()
        self.binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        self.buffers = []
        heads, head_dim = kv_shape
        for name in past:
            buf = ort.OrtValue.ortvalue_from_shape_and_type((1, heads, capacity, head_dim), np.float32, "cpu", 0)
            self.buffers.append(buf)
            self.binding.bind_ortvalue_input(name, buf)
            self.binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), buf)

    def prefill(self) -> np.ndarray:
        return self._call(self.ids)

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray:
        self.tokens += 1
        return self._call(np.asarray([tokens[:1]], dtype=np.int64))

    def _call(self, ids: np.ndarray) -> np.ndarray:
        # bind_cpu_input binds the array's memory without a copy: keep both arrays alive through the run
        self.feeds = (np.ascontiguousarray(ids, dtype=np.int64), np.ones((1, self.tokens), dtype=np.int64))
        self.binding.bind_cpu_input("input_ids", self.feeds[0])
        self.binding.bind_cpu_input("attention_mask", self.feeds[1])
        self.binding.bind_output("logits", "cpu")  # a fresh buffer: its shape changes after the prompt
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()[:, -1, :]

    def logits(self) -> np.ndarray:
        """All positions' logits of the prompt (one call, for accuracy checks)."""
        self._call(self.ids)
        return self.binding.get_outputs()[0].numpy()[0]


class GQADecoder(Decoder):
    """A causal LM on onnxruntime through its fused decode graph (see the module docstring)."""

    backend = "onnxruntime"
    cache = "in-place (GroupQueryAttention)"
    batched = False

    def __init__(self, backend: Any, graph: Path, lowering: dict[str, Any], opts: DecodeOptions):
        import time

        self.backend = backend.name
        self.lowering = lowering
        self.past = tuple(kv_names(lowering))
        kv = lowering["kv"]
        self.kv_shape = (int(kv["kv_heads"]), int(kv["head_dim"]))
        self.positions = int((lowering.get("decode_graph") or {}).get("positions") or 0)
        before, start = rss_bytes(), time.perf_counter()
        ropts = RunnerOptions(threads=opts.threads, batch_size=1, seqlen=opts.prompt_len)
        self.runner = backend.runner(graph, ropts)
        self.session = self.runner.session
        self.details = {"cache": self.cache, "graph": graph.name, "io_binding": True,
                        "load_seconds": time.perf_counter() - start, "rss_load_delta_bytes": rss_bytes() - before,
                        "rss_process": "this process", **getattr(self.runner, "details", {})}

    def run(self, ids: np.ndarray, mask: np.ndarray, requests: list[GenRequest], eos_ids: tuple[int, ...],
            pad_id: int = 0) -> tuple[list[GenResult], DecodeTrace]:
        if ids.shape[0] != 1 or len(requests) != 1:
            raise SparsecError(f"the fused onnxruntime decoder runs one request at a time, got {ids.shape[0]}")
        prompt = ids[:, mask[0].astype(bool)]
        capacity = prompt.shape[1] + max(r.params.max_tokens for r in requests)
        if self.positions and capacity > self.positions:
            raise SparsecError(f"{capacity} tokens exceed the model's {self.positions} positions")
        return generate(InPlaceCache(self.session, self.past, self.kv_shape, prompt, capacity), requests, eos_ids)

    def check_request(self, prompt_len: int, max_tokens: int) -> str | None:
        if self.positions and prompt_len + max_tokens > self.positions:
            return f"{prompt_len} + {max_tokens} tokens exceed the model's {self.positions} positions"
        return None

    def prefill_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rows = []
        for row_ids, row_mask in zip(ids, mask):
            valid = row_mask.astype(bool)
            logits = InPlaceCache(self.session, self.past, self.kv_shape, row_ids[valid][None, :], int(valid.sum())).logits()
            full = np.zeros((len(row_mask), logits.shape[-1]), dtype=logits.dtype)
            full[valid] = logits
            rows.append(full)
        return np.stack(rows)

    def close(self) -> None:
        self.runner.close()
