"""onnxruntime decoding on the fused graph (`decode_gqa.onnx`, compiler/lowering/gqa.py): the KV cache is
one buffer per tensor, sized for prompt + new tokens, that GroupQueryAttention appends to in place.

The graph's `past_key_values.{i}.*` input and its `present.{i}.*` output are bound (IOBinding) to the
*same* OrtValue — onnxruntime-genai's "past_present_share_buffer" — so a step writes one slot per layer
and copies nothing; the positions come from the attention mask inside the graph. What crosses the
Python boundary per step is the new token, a mask of ones and the logits.

Batches (the server's concurrent completions): GroupQueryAttention rotates a prompt by positions counted
from its first token, so each prompt is prefilled alone, stripped of its padding, straight into its row of
the batch cache; the decode steps then run every row at once, each with its own valid length
(`InPlaceCache`). `prefill_logits` runs row by row and leaves zeros at padded positions.
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
    """`loop.Cache` on the fused graph: a batch of requests on one preallocated cache per KV tensor,
    (rows, kv_heads, capacity, head_dim), that GroupQueryAttention appends to in place.

    The cache arrays are numpy memory wrapped as OrtValues (no copy), so each prompt is prefilled alone
    (GroupQueryAttention rotates a prompt by positions counted from 0, so prompts of different lengths
    cannot share a call) straight into its row — a contiguous view of the batch arrays — and the decode
    steps then run all rows at once, each row's valid length given by its attention mask (ones up to its
    own length: `seqlens_k` per row in the graph). A finished row is dropped by compacting the arrays."""

    def __init__(self, session: Any, past: tuple[str, ...], kv_shape: tuple[int, int], prompts: list[np.ndarray],
                 capacity: int):
        self.session = session
        self.past = past
        self.prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        self.lengths = [len(p) for p in self.prompts]
        heads, head_dim = kv_shape
        self.arrays = [np.zeros((len(prompts), heads, capacity, head_dim), dtype=np.float32) for _ in past]
        self.binding = self._bind(self.arrays)

    def _bind(self, arrays: list[np.ndarray]) -> Any:
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for name, array in zip(self.past, arrays):
            value = ort.OrtValue.ortvalue_from_numpy(array)  # wraps the array's memory: it must stay alive
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        return binding

    def prefill(self) -> np.ndarray:
        return np.stack([self.row_logits(r)[-1] for r in range(len(self.prompts))])

    def row_logits(self, row: int) -> np.ndarray:
        """Prefill one prompt into its row of the cache; all its positions' logits (tokens, vocab)."""
        binding = self._bind([a[row:row + 1] for a in self.arrays])
        return self._run(binding, self.prompts[row][None, :], np.ones((1, self.lengths[row]), dtype=np.int64))[0]

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray:
        if len(keep_rows) != len(self.lengths):  # finished requests leave the batch: compact the cache
            self.arrays = [np.ascontiguousarray(a[keep_rows]) for a in self.arrays]
            self.lengths = [self.lengths[r] for r in keep_rows]
            self.binding = self._bind(self.arrays)
        self.lengths = [n + 1 for n in self.lengths]
        mask = (np.arange(max(self.lengths))[None, :] < np.asarray(self.lengths)[:, None]).astype(np.int64)
        return self._run(self.binding, np.asarray(tokens, dtype=np.int64)[:, None], mask)[:, -1, :]

    def _run(self, binding: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # bind_cpu_input binds the arrays' memory without a copy: keep them alive through the run
        self.feeds = (np.ascontiguousarray(ids), np.ascontiguousarray(mask))
        binding.bind_cpu_input("input_ids", self.feeds[0])
        binding.bind_cpu_input("attention_mask", self.feeds[1])
        binding.bind_output("logits", "cpu")  # a fresh buffer: its shape changes after the prompt
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


class GQADecoder(Decoder):
    """A causal LM on onnxruntime through its fused decode graph (see the module docstring)."""

    backend = "onnxruntime"
    cache = "in-place (GroupQueryAttention)"
    batched = True

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
        # a graph exported with a fixed batch of 1 (before the batch axis was dynamic) serves one request per call
        batch = self.session.get_inputs()[0].shape[0]
        self.batched = not isinstance(batch, int) or batch != 1
        self.details = {"cache": self.cache, "graph": graph.name, "io_binding": True,
                        "load_seconds": time.perf_counter() - start, "rss_load_delta_bytes": rss_bytes() - before,
                        "rss_process": "this process", **getattr(self.runner, "details", {})}

    def run(self, ids: np.ndarray, mask: np.ndarray, requests: list[GenRequest], eos_ids: tuple[int, ...],
            pad_id: int = 0) -> tuple[list[GenResult], DecodeTrace]:
        prompts = [row[m.astype(bool)] for row, m in zip(ids, mask)]  # left padding stripped per row
        capacity = max(len(p) for p in prompts) + max(r.params.max_tokens for r in requests)
        if self.positions and capacity > self.positions:
            raise SparsecError(f"{capacity} tokens exceed the model's {self.positions} positions")
        return generate(InPlaceCache(self.session, self.past, self.kv_shape, prompts, capacity), requests, eos_ids)

    def check_request(self, prompt_len: int, max_tokens: int) -> str | None:
        if self.positions and prompt_len + max_tokens > self.positions:
            return f"{prompt_len} + {max_tokens} tokens exceed the model's {self.positions} positions"
        return None

    def prefill_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(rows, width, vocab): each row's prompt run alone, its logits at its valid positions, zeros elsewhere."""
        valid = mask.astype(bool)
        cache = InPlaceCache(self.session, self.past, self.kv_shape, [row[m] for row, m in zip(ids, valid)],
                             max(1, int(valid.sum(1).max())))
        rows = [cache.row_logits(r) for r in range(len(ids))]
        out = np.zeros((*ids.shape, rows[0].shape[-1]), dtype=rows[0].dtype)
        for r, logits in enumerate(rows):
            out[r, valid[r]] = logits
        return out

    def close(self) -> None:
        self.runner.close()
