"""DeepSparse worker: runs INSIDE the DeepSparse virtualenv (Python 3.11, deepsparse 1.8, onnx<1.15,
numpy<2), started by `runtimes.deepsparse_backend`. It may import only the stdlib, numpy, onnx and
deepsparse — never sparsec's packages (they are not installed in that venv).

Protocol (stdin -> worker, worker -> stdout), one request then one response, in order:
  message = frame(JSON header) + one frame per array named in header["arrays"]
  frame   = 8-byte big-endian unsigned length + that many bytes
Arrays travel as `np.save` bytes (allow_pickle=False on both sides). Requests:
  {"op": "load", "model": PATH, "batch_size": B, "seqlen": S, "threads": T}
      -> {"ok": true, "input_names", "input_shapes", "output_names", "fraction_of_supported_ops", ...}
  {"op": "run", "arrays": [input names]} + arrays -> {"ok": true, "arrays": [output names], "engine_ms"} + arrays
  {"op": "analyze", "arrays": [...]} + arrays -> {"ok": true, "layers": [...], "sparse_layers": [...]}
  {"op": "close"} -> {"ok": true}, then the worker exits 0.
A failure the engine reports as a Python exception becomes {"ok": false, "error": "..."}; a native
abort kills the process, which the parent reports with the exit status and the stderr tail.
Library output (DeepSparse's banner, logs) is moved to stderr so stdout carries only the protocol.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
import traceback
from typing import Callable

import numpy as np

_LEN = struct.Struct(">Q")


def read_message(read_exact: Callable[[int], bytes]) -> tuple[dict, dict[str, np.ndarray]]:
    """Decode one message; `read_exact(n)` returns exactly n bytes or raises (EOF, timeout)."""
    (n,) = _LEN.unpack(read_exact(_LEN.size))
    header = json.loads(read_exact(n))
    arrays = {}
    for name in header.get("arrays", []):
        (size,) = _LEN.unpack(read_exact(_LEN.size))
        arrays[name] = np.load(io.BytesIO(read_exact(size)), allow_pickle=False)
    return header, arrays


def encode_message(header: dict, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    arrays = arrays or {}
    body = json.dumps(dict(header, arrays=list(arrays))).encode()
    parts = [_LEN.pack(len(body)), body]
    for arr in arrays.values():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        data = buf.getvalue()
        parts += [_LEN.pack(len(data)), data]
    return b"".join(parts)


def _stream_reader(stream) -> Callable[[int], bytes]:
    def read_exact(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = stream.read(n - got)
            if not chunk:
                raise EOFError("parent closed the pipe")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    return read_exact


def _input_shapes(model_path: str, batch_size: int, seqlen: int) -> list[list[int]] | None:
    """Static shapes to impose when the file still has symbolic dims (None when already static)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    shapes, dynamic = [], False
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = []
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dynamic = True
                dims.append(batch_size if axis == 0 else seqlen)
        shapes.append(dims)
    return shapes if dynamic else None


def graph_facts(model_path: str) -> dict:
    """Weight sparsity of the matmul weights (exact zeros) and the graph's precision, cheaply from the file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(model_path)
    inits = {i.name: i for i in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    zeros = total = 0
    for node in model.graph.node:
        slot = {"MatMul": 1, "Gemm": 1, "MatMulInteger": 1, "QLinearMatMul": 3}.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] in inits:
            w = numpy_helper.to_array(inits[node.input[slot]])
            zeros += int(w.size - np.count_nonzero(w))
            total += int(w.size)
    return {"weight_sparsity": zeros / total if total else 0.0, "precision": graph_precision(ops)}


def graph_precision(ops: set[str]) -> str:
    """'int8 (QOperator)', 'int8 (QDQ)' or 'fp32', from a graph's op types."""
    if ops & {"QLinearMatMul", "MatMulInteger"}:
        return "int8 (QOperator)"
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8 (QDQ)"
    return "fp32"


class Worker:
    def __init__(self) -> None:
        self.engine = None
        self.load_args: dict = {}

    def load(self, req: dict, arrays: dict) -> tuple[dict, dict]:
        import deepsparse
        from deepsparse import Engine

        start = time.perf_counter()
        shapes = _input_shapes(req["model"], req["batch_size"], req["seqlen"])
        self.engine = Engine(req["model"], batch_size=req["batch_size"], num_cores=req["threads"], input_shapes=shapes)
        self.load_args = dict(req)
        eng = self.engine
        return {
            "ok": True,
            "version": deepsparse.__version__,
            "compile_seconds": time.perf_counter() - start,
            "input_names": list(eng.input_names),
            "input_shapes": [list(s) for s in eng.input_shapes],
            "output_names": list(eng.output_names),
            "fraction_of_supported_ops": float(eng.fraction_of_supported_ops),
            "cpu_avx_type": eng.cpu_avx_type,
            "cpu_vnni": bool(eng.cpu_vnni),
            "num_cores": eng.num_cores,
            "imposed_static_shapes": shapes is not None,
            **graph_facts(req["model"]),
        }, {}

    def ops(self) -> dict:
        return {"load": self.load, "run": self.run, "analyze": self.analyze}

    def _ordered(self, arrays: dict) -> list[np.ndarray]:
        return [np.ascontiguousarray(arrays[name]) for name in self.engine.input_names]

    def run(self, req: dict, arrays: dict) -> tuple[dict, dict]:
        start = time.perf_counter()
        outputs = self.engine.run(self._ordered(arrays), val_inp=True)
        engine_ms = (time.perf_counter() - start) * 1e3
        return {"ok": True, "engine_ms": engine_ms}, dict(zip(self.engine.output_names, outputs))

    def analyze(self, req: dict, arrays: dict) -> tuple[dict, dict]:
        """Per-layer kernel report from DeepSparse's debug-analysis engine (a second compile)."""
        from deepsparse.engine import DebugAnalysisEngine

        args = self.load_args
        shapes = _input_shapes(args["model"], args["batch_size"], args["seqlen"])
        engine = DebugAnalysisEngine(args["model"], batch_size=args["batch_size"], num_cores=args["threads"],
                                     input_shapes=shapes, num_iterations=1, num_warmup_iterations=0)
        feeds = self._ordered(arrays) if arrays else [np.zeros_like(a) for a in engine.generate_random_inputs()]
        info = engine.analyze(feeds)
        layers, sparse = [], []
        for sub in info.get("layer_info", []):
            for layer in [sub, *sub.get("sub_layer_info", [])]:
                entry = {"kernel": layer.get("name", ""), "layer": layer.get("canonical_name", ""),
                         "kernel_sparsity": float(layer.get("kernel_sparsity", 0.0) or 0.0)}
                layers.append(entry)
                if entry["kernel_sparsity"] > 0:
                    sparse.append(entry)
        return {"ok": True, "layers": layers, "sparse_layers": sparse}, {}


def main(worker: "Worker | None" = None) -> int:
    """Serve requests until `close` or EOF; `worker.ops()` names the ops (extended by subclasses,
    e.g. runtimes/decode/deepsparse_loop_server.py)."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # its import otherwise phones home
    read_exact = _stream_reader(os.fdopen(os.dup(0), "rb", buffering=0))
    proto_out = os.fdopen(os.dup(1), "wb")

    def send(header: dict, arrays: dict | None = None) -> None:
        proto_out.write(encode_message(header, arrays))
        proto_out.flush()

    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    worker = worker or Worker()
    ops = worker.ops()
    while True:
        try:
            req, arrays = read_message(read_exact)
        except EOFError:
            return 0
        op = req.get("op")
        if op == "close":
            send({"ok": True})
            return 0
        try:
            if op not in ops:
                raise ValueError(f"unknown op {op!r}")
            if op != "load" and worker.engine is None:
                raise RuntimeError("no model loaded")
            header, out = ops[op](req, arrays)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises a typed error
            traceback.print_exc(file=sys.stderr)
            header, out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, {}
        send(header, out)


if __name__ == "__main__":
    sys.exit(main())
