"""onnxruntime decoding with IO binding: the KV cache stays in onnxruntime's memory between steps.

The generic dynamic decoder (runtimes/decode/decoders.py) calls `session.run` every step: the past
KV tensors go in as numpy arrays and the grown `present.*` tensors come back as new numpy arrays, so
each step moves the whole cache across the Python boundary twice (SmolLM2 at 192 tokens: 30 layers ×
2 × 3 heads × 192 × 64 fp32 = 8.8 MB per step). With an `IOBinding` the present tensors are bound to
onnxruntime-allocated CPU buffers, and the next step binds those same `OrtValue`s as its past inputs:
no copy, no numpy wrapper; only the logits (and the few ids/mask/position inputs) cross. The cache
still grows by one slot per step (the portable graph concatenates past and new keys). Llama-family models
decode on the fused graph instead (runtimes/decode/onnxruntime_gqa.py: GroupQueryAttention appends into
one preallocated buffer); this decoder serves the other causal LMs and `cache="dynamic"`.

Row selection (a finished request dropped from the batch) is the one place the cache must be copied
out; `BoundKV[rows]` does it only when rows actually drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtimes.decode.decoders import DecodeOptions, DynamicDecoder
from runtimes.decode.loop import DynamicCache, generate


class BoundKV:
    """A KV tensor left in onnxruntime's memory (an OrtValue) between decode steps."""

    def __init__(self, value: Any):
        self.value = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    def __getitem__(self, rows: Any) -> "BoundKV | np.ndarray":
        rows = np.asarray(rows)
        if rows.ndim == 1 and len(rows) == self.shape[0] and bool((rows == np.arange(len(rows))).all()):
            return self  # every row kept: the same buffer
        return self.value.numpy()[rows]


class BoundRun:
    """`run(feeds) -> outputs` through one IOBinding per call: `BoundKV` inputs bound as they are,
    numpy inputs bound from host memory; outputs named in `kv_outputs` come back as BoundKV."""

    def __init__(self, session: Any, kv_outputs: set[str]):
        self.session = session
        self.kv_outputs = kv_outputs
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_names = {i.name for i in session.get_inputs()}

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if name not in self.input_names:
                continue
            if isinstance(value, BoundKV):
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {n: (BoundKV(o) if n in self.kv_outputs else o.numpy()) for n, o in zip(self.output_names, outs)}


class BoundDynamicDecoder(DynamicDecoder):
    """The dynamic decoder on onnxruntime with the KV cache kept in place between steps."""

    def __init__(self, backend: Any, model_path: Path, lowering: dict[str, Any], opts: DecodeOptions, workdir: Path):
        super().__init__(backend, model_path, lowering, opts, workdir)
        self.bound = BoundRun(self.runner.session, set(self.layout.present_names))
        self.details["io_binding"] = True

    def run(self, ids, mask, requests, eos_ids, pad_id=0):
        return generate(DynamicCache(self.bound, self.layout, ids, mask), requests, eos_ids)
