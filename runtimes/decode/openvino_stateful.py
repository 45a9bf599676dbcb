"""OpenVINO decoder on the stateful form of the lowered causal LM (the form openvino-genai runs).

Why: with the cache as graph inputs/outputs (`DynamicDecoder`), every token copies 2 × layers KV
tensors out of the infer request into numpy and back in, and OpenVINO re-plans the 60+ input shapes;
with `make_stateful` (runtimes/openvino_backend.py) the cache stays inside the request, each step
feeds three small tensors, and the CPU plugin can fuse the cache concat into its attention kernel.
Numerics are the same graph's; only where the cache lives changes.

Opened by `OpenVinoBackend.decoder` when the decode options leave the cache form to the backend
(`cache="auto"` or `"stateful"`); this module asks the backend object for the compiled model and never
imports the backend module. The loop is `loop.generate`, as for every decoder; a batch of prompts
shares one request, finished rows are dropped from the states (`OpenVinoStatefulRunner.keep`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from compiler.lowering.feeds import lm_feeds
from runtimes.base import RunnerOptions
from runtimes.decode.decoders import DecodeOptions, Decoder
from runtimes.decode.loop import DecodeTrace, GenRequest, GenResult, generate, positions_from_mask, rss_bytes


class StatefulCache:
    """The `loop.Cache` of a stateful model: the runner holds the KV cache; this keeps the mask."""

    def __init__(self, runner: Any, ids: np.ndarray, mask: np.ndarray, has_position_ids: bool):
        self.runner = runner
        self.ids = ids.astype(np.int64)
        self.mask = mask.astype(np.int64)
        self.has_position_ids = has_position_ids

    def prefill(self) -> np.ndarray:
        self.runner.reset(self.ids.shape[0])
        return self._call()

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray:
        self.runner.keep(list(keep_rows))
        new = np.asarray(tokens, dtype=np.int64)[:, None]
        self.mask = np.concatenate([self.mask[np.asarray(keep_rows, dtype=np.int64)], np.ones_like(new)], axis=1)
        self.ids = new
        return self._call()

    def _call(self) -> np.ndarray:
        feeds = {"input_ids": self.ids, "attention_mask": self.mask}
        if self.has_position_ids:
            feeds["position_ids"] = positions_from_mask(self.mask, self.ids.shape[1])
        return self.runner.infer(feeds)["logits"][:, -1, :]


class StatefulDecoder(Decoder):
    """A lowered causal LM on OpenVINO with its cache kept in the infer request; batched like the
    dynamic decoder (the server's dynamic batches share one request)."""

    cache = "stateful"
    batched = True

    def __init__(self, backend: Any, model_path: Path, lowering: dict[str, Any], opts: DecodeOptions):
        self.backend = backend.name
        self.lowering = lowering
        self.has_position_ids = "position_ids" in lowering.get("inputs", ())
        before = rss_bytes()
        start = time.perf_counter()
        self.runner = backend.stateful_runner(Path(model_path), RunnerOptions(threads=opts.threads, batch_size=1,
                                                                              seqlen=opts.prompt_len))
        self.details = {"cache": self.cache, "load_seconds": time.perf_counter() - start,
                        "rss_load_delta_bytes": rss_bytes() - before, "rss_process": "this process",
                        **self.runner.details}

    def run(self, ids: np.ndarray, mask: np.ndarray, requests: list[GenRequest], eos_ids: tuple[int, ...],
            pad_id: int = 0) -> tuple[list[GenResult], DecodeTrace]:
        return generate(StatefulCache(self.runner, ids, mask, self.has_position_ids), requests, eos_ids)

    def prefill_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """All positions' logits of one prompt (the accuracy checks), on a fresh cache."""
        self.runner.reset(ids.shape[0])
        feeds = {k: v for k, v in lm_feeds(self.lowering, ids, mask).items() if not k.startswith("past_key_values.")}
        return self.runner.infer(feeds)["logits"]

    def close(self) -> None:
        self.runner.close()
