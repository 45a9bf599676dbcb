"""DeepSparse decoder: fixed-shape prefill/decode graphs compiled and run in the DeepSparse worker
(runtimes/decode/worker_deepsparse.py), which also runs the greedy loop, so one `generate` is one
request. RSS figures are the worker's: it is the process that holds the weights."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.decode.decoders import DecodeOptions, Decoder, _check_prompt, kv_shapes, static_graphs
from runtimes.decode.loop import DecodeTrace

WORKER = Path(__file__).with_name("worker_deepsparse.py")


def _deepsparse_rewrite(model: Any) -> Any:
    """DeepSparse's own graph rules (domains, IR ≤ 9, opset ≤ 17), as its backend's prepare applies them."""
    from runtimes.deepsparse_backend import check_domains, downgrade

    check_domains(model)
    return downgrade(model)[0]


def _graph_facts(path: Path) -> dict[str, Any]:
    import onnx

    from runtimes.decode.traffic import weight_traffic
    from runtimes.deepsparse_worker import graph_precision

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return {"precision": graph_precision(ops), "weight_sparsity": round(weight_traffic(path).sparsity, 4)}


class DeepSparseDecoder(Decoder):
    backend = "deepsparse"
    cache = "static"

    def __init__(self, backend: Any, model_path: Path, lowering: dict[str, Any], opts: DecodeOptions, workdir: Path):
        from compiler.errors import BackendUnavailable
        from runtimes.deepsparse_backend import _Worker
        from runtimes.venvs import DEEPSPARSE, venv_dir, venv_python

        ok, reason = backend.available()
        if not ok:
            raise BackendUnavailable(f"backend 'deepsparse' is not available: {reason}; install: {backend.install_hint}")
        self.opts = opts
        self.shapes = kv_shapes(lowering)
        start = time.perf_counter()
        prefill, decode = static_graphs(model_path, workdir, opts, _deepsparse_rewrite)
        self._worker = _Worker(venv_python(venv_dir(DEEPSPARSE)), backend.infer_timeout_s, script=WORKER)
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
        self._kernels: dict[str, Any] | None = None
        self._facts = _graph_facts(decode)
        self._details = {"cache": self.cache, "slots": opts.slots, "prefill": opts.prefill,
                        "release_prefill": opts.release_prefill, "load_seconds": time.perf_counter() - start,
                        "engine": f"deepsparse {info['version']}", "compile_seconds": info["compile_seconds"],
                        "rss_load_delta_bytes": info["rss_after_load"] - info["rss_before_load"],
                        "rss_process": "deepsparse worker", "worker_pid": self._worker.pid,
                        "fraction_of_supported_ops": info["fraction_of_supported_ops"],
                        "licence": backend.licence_notice}

    def generate(self, ids, mask, new_tokens, stop_ids=(), pad_id=0) -> DecodeTrace:
        _check_prompt(ids, mask, new_tokens, self.opts, True)
        # the whole generation is one request: allow the per-token timeout for every token
        timeout = self._timeout * (new_tokens + 1) + (self._details["load_seconds"] if self.opts.release_prefill else 0)
        reply, _ = self._worker.request({"op": "generate", "new_tokens": int(new_tokens), "stop_ids": [int(s) for s in stop_ids],
                                         "pad_id": int(pad_id)},
                                        {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)},
                                        timeout_s=timeout)
        t = reply["trace"]
        return DecodeTrace(tokens=list(t["tokens"]), prefill_ms=float(t["prefill_ms"]), step_ms=list(t["step_ms"]),
                           peak_rss_bytes=int(t["peak_rss_bytes"]), stopped=t["stopped"])

    def prefill_logits(self, ids, mask) -> np.ndarray:
        _check_prompt(ids, mask, 1, self.opts, True)
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
        from runtimes.deepsparse_backend import MIN_SPARSITY_FOR_ANALYSIS

        kernels = self.sparse_kernels() if self._facts["weight_sparsity"] >= MIN_SPARSITY_FOR_ANALYSIS else None
        return {**self._details, **self._facts, "sparse_kernels": bool(kernels and kernels["used"]),
                "sparse_layers": kernels["sparse_layers"] if kernels else 0}

    @property
    def pid(self) -> int:
        return self._worker.pid

    def close(self) -> None:
        self._worker.close()
