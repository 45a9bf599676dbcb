"""DeepSparse decoder: fixed-shape prefill/decode graphs compiled and run in the DeepSparse worker
(runtimes/decode/deepsparse_loop_server.py), which also runs the generation loop, so one `generate` is one
request. RSS figures are the worker's: it is the process that holds the weights.

Opened by `DeepSparseBackend.decoder` (its declared decoder); what it needs from the backend (graph
rules, the worker process, timeouts) it asks of the backend object it is given, so this module never
imports the backend module."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.decode.decoders import DecodeOptions, Decoder, check_prompt, kv_shapes, static_graphs, static_limits
from runtimes.decode.loop import DecodeTrace, GenResult
from runtimes.decode.traffic import weight_traffic
from runtimes.deepsparse_worker import graph_precision

WORKER = Path(__file__).with_name("deepsparse_loop_server.py")


def _graph_facts(path: Path) -> dict[str, Any]:
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return {"precision": graph_precision(ops), "weight_sparsity": round(weight_traffic(path).sparsity, 4)}


class DeepSparseDecoder(Decoder):
    backend = "deepsparse"
    cache = "static"

    def __init__(self, backend: Any, model_path: Path, lowering: dict[str, Any], opts: DecodeOptions, workdir: Path):
        from compiler.errors import BackendUnavailable

        ok, reason = backend.available()
        if not ok:
            raise BackendUnavailable(f"backend 'deepsparse' is not available: {reason}; install: {backend.install_hint}")
        self.opts = opts
        self.shapes = kv_shapes(lowering)
        start = time.perf_counter()
        prefill, decode = static_graphs(model_path, workdir, opts, backend.engine_graph)
        self._worker = backend.worker_process(WORKER)
        try:
            info, _ = self._worker.request(
                {"op": "load", "decode_model": str(decode.resolve()), "prefill_model": str(prefill.resolve()) if prefill else None,
                 "slots": opts.slots, "prefill_len": opts.prompt_len, "threads": opts.threads,
                 "kv_shapes": {n: list(s) for n, s in self.shapes.items()}, "release_prefill": opts.release_prefill},
                timeout_s=backend.load_timeout_s)
        except BaseException:
            self._worker.close()
            raise
        self._timeout = backend.infer_timeout_s
        self._load_timeout = backend.load_timeout_s
        self._min_sparsity = backend.min_sparsity_for_analysis
        self._min_sparsity = backend.min_sparsity_for_analysis
        self._kernels: dict[str, Any] | None = None
        self._facts = _graph_facts(decode)
        self._details = {"cache": self.cache, "slots": opts.slots, "prefill": opts.prefill,
                        "release_prefill": opts.release_prefill, "load_seconds": time.perf_counter() - start,
                        "engine": f"deepsparse {info['version']}", "compile_seconds": info["compile_seconds"],
                        "rss_load_delta_bytes": info["rss_after_load"] - info["rss_before_load"],
                        "rss_process": "deepsparse worker", "worker_pid": self._worker.pid,
                        "fraction_of_supported_ops": info["fraction_of_supported_ops"],
                        "licence": backend.licence_notice}

    def run(self, ids, mask, requests, eos_ids, pad_id=0):
        """One request per worker call (the loop runs in the worker); the request's callback sees the
        tokens after the generation, in order, and may still cut it (stop strings)."""
        (request,) = requests
        new_tokens = request.params.max_tokens
        check_prompt(ids, mask, new_tokens, self.opts, True)
        # the whole generation is one request: allow the per-token timeout for every token
        timeout = self._timeout * (new_tokens + 1) + (self._details["load_seconds"] if self.opts.release_prefill else 0)
        reply, _ = self._worker.request({"op": "generate", "new_tokens": int(new_tokens), "stop_ids": [int(s) for s in eos_ids],
                                         "pad_id": int(pad_id), "sampling": request.params.to_dict()},
                                        {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)},
                                        timeout_s=timeout)
        t = reply["trace"]
        trace = DecodeTrace(tokens=list(t["tokens"]), prefill_ms=float(t["prefill_ms"]), step_ms=list(t["step_ms"]),
                            peak_rss_bytes=int(t["peak_rss_bytes"]), stopped=t["stopped"])
        tokens, finish = [], reply["result"]["finish_reason"]
        for token in reply["result"]["tokens"]:
            tokens.append(int(token))
            if not request.on_token(int(token)):
                finish = "stop"
                break
        return [GenResult(tuple(tokens), finish)], trace

    def check_request(self, prompt_len: int, max_tokens: int) -> str | None:
        return static_limits(self.opts, prompt_len, max_tokens)

    def prefill_logits(self, ids, mask) -> np.ndarray:
        check_prompt(ids, mask, 1, self.opts, True)
        _, out = self._worker.request({"op": "prefill"}, {"input_ids": ids.astype(np.int64),
                                                          "attention_mask": mask.astype(np.int64)})
        return out["logits"]

    def sparse_kernels(self) -> dict[str, Any]:
        """Which layers of the decode graph DeepSparse compiled with sparse kernels (its analysis
        engine: one more compile, asked once)."""
        if self._kernels is None:
            reply, _ = self._worker.request({"op": "analyze"}, timeout_s=self._load_timeout)
            sparse = {e["layer"]: e["kernel_sparsity"] for e in reply["sparse_layers"]}
            self._kernels = {"used": bool(sparse), "sparse_layers": len(sparse), "by_layer": sparse}
        return self._kernels

    @property
    def details(self) -> dict[str, Any]:
        """Load facts, precision, weight sparsity, and (when the weights hold zeros) whether sparse kernels ran."""
        kernels = self.sparse_kernels() if self._facts["weight_sparsity"] >= self._min_sparsity else None
        return {**self._details, **self._facts, "sparse_kernels": bool(kernels and kernels["used"]),
                "sparse_layers": kernels["sparse_layers"] if kernels else 0}

    @property
    def pid(self) -> int:
        return self._worker.pid

    def close(self) -> None:
        self._worker.close()
