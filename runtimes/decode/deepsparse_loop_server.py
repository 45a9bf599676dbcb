"""DeepSparse decode worker: runs INSIDE the DeepSparse virtualenv, like runtimes/deepsparse_worker.py
(same protocol, same `main`), with the generation loop of runtimes/decode/loop.py in-process so the KV
cache never crosses the pipe. Imports only the stdlib, numpy, deepsparse and those two
modules (their directories put on sys.path from this file's location: `python -I` does not add them).

Ops (besides `close`):
  {"op": "load", "decode_model": PATH, "prefill_model": PATH | null, "slots": S, "prefill_len": P,
   "kv_shapes": {name: [1, heads, 0, head_dim]}, "threads": T, "release_prefill": bool}
      -> {"ok", "version", "compile_seconds", "rss_before_load", "rss_after_load", "fraction_of_supported_ops"}
  {"op": "generate", "new_tokens": N, "stop_ids": [...], "pad_id": id, "sampling": {temperature, top_p, seed} | absent}
      + arrays {input_ids, attention_mask}
      -> {"ok", "trace": DecodeTrace.to_dict(), "result": {"tokens": [...], "finish_reason"}} (loop.generate: greedy
      without "sampling"; the eos token is in the trace, not in the result)
  {"op": "prefill"} + arrays {input_ids, attention_mask} -> {"ok"} + arrays {logits} (static prefill graph)
  {"op": "analyze"} -> the base worker's per-layer kernel report, for the decode graph.
`release_prefill`: the prefill engine is compiled for each `generate` and freed before decoding, so
only the decode engine's weights are resident while tokens are generated (slower start, half the
memory); otherwise both engines stay loaded.
"""

from __future__ import annotations

import gc
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # runtimes/decode/ (loop.py), runtimes/ (deepsparse_worker.py)

import numpy as np  # noqa: E402
from deepsparse_worker import Worker, main  # noqa: E402
from loop import GenRequest, SamplingParams, StaticCache, generate, left_pad, rss_bytes, static_prefill_feeds  # noqa: E402


class DecodeWorker(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.prefill_engine = None
        self.args: dict = {}

    def ops(self) -> dict:
        return {"load": self.load, "generate": self.generate, "prefill": self.prefill, "analyze": self.analyze}

    def _engine(self, path: str):
        from deepsparse import Engine

        return Engine(path, batch_size=1, num_cores=self.args["threads"])

    def load(self, req: dict, arrays: dict) -> tuple[dict, dict]:
        import deepsparse

        self.args = dict(req)
        self.load_args = {"model": req["decode_model"], "batch_size": 1, "seqlen": 1, "threads": req["threads"]}
        before = rss_bytes()
        start = time.perf_counter()
        self.engine = self._engine(req["decode_model"])
        if req.get("prefill_model") and not req.get("release_prefill"):
            self.prefill_engine = self._engine(req["prefill_model"])
        return {"ok": True, "version": deepsparse.__version__, "compile_seconds": time.perf_counter() - start,
                "rss_before_load": before, "rss_after_load": rss_bytes(),
                "fraction_of_supported_ops": float(self.engine.fraction_of_supported_ops),
                "cpu_avx_type": self.engine.cpu_avx_type, "cpu_vnni": bool(self.engine.cpu_vnni)}, {}

    @staticmethod
    def _call(engine, feeds: dict) -> dict:
        ordered = [np.ascontiguousarray(feeds[n]) for n in engine.input_names]
        return dict(zip(engine.output_names, engine.run(ordered)))

    def _prefill_engine(self):
        if not self.args.get("prefill_model"):
            return None
        return self.prefill_engine or self._engine(self.args["prefill_model"])

    def generate(self, req: dict, arrays: dict) -> tuple[dict, dict]:
        args = self.args
        shapes = {n: tuple(s) for n, s in args["kv_shapes"].items()}
        engine = self._prefill_engine()
        transient = engine is not None and engine is not self.prefill_engine

        def prefill(feeds: dict) -> dict:
            nonlocal engine
            out = self._call(engine, feeds)
            if transient:  # free the prefill engine before the first decode step
                engine = None
                gc.collect()
            return out

        cache = StaticCache(prefill if engine is not None else None, lambda f: self._call(self.engine, f), shapes,
                            int(args["slots"]), int(args["prefill_len"]), arrays["input_ids"], arrays["attention_mask"],
                            int(req.get("pad_id", 0)))
        sampling = req.get("sampling") or {}
        params = SamplingParams(max_tokens=int(req["new_tokens"]), temperature=float(sampling.get("temperature", 0.0)),
                                top_p=float(sampling.get("top_p", 1.0)), seed=sampling.get("seed"))
        (result,), trace = generate(cache, [GenRequest([], params)], tuple(req.get("stop_ids", ())))
        return {"ok": True, "trace": trace.to_dict(),
                "result": {"tokens": list(result.tokens), "finish_reason": result.finish_reason}}, {}

    def prefill(self, req: dict, arrays: dict) -> tuple[dict, dict]:
        """Logits of the static prefill graph for one (left-padded) prompt: accuracy checks."""
        engine = self._prefill_engine()
        if engine is None:
            raise RuntimeError("no prefill model loaded")
        shapes = {n: tuple(s) for n, s in self.args["kv_shapes"].items()}
        ids, mask = left_pad(arrays["input_ids"], arrays["attention_mask"], int(self.args["prefill_len"]),
                             int(req.get("pad_id", 0)))
        out = self._call(engine, static_prefill_feeds(ids, mask, shapes))
        width = arrays["input_ids"].shape[1]
        return {"ok": True}, {"logits": np.ascontiguousarray(out["logits"][:, -width:])}


if __name__ == "__main__":
    sys.exit(main(DecodeWorker()))
