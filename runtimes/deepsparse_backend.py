"""DeepSparse backend: Neural Magic's sparse-aware CPU engine, run in a worker subprocess.

DeepSparse 1.8 cannot share our environment (it pins onnx<1.15, numpy<2, Python ≤ 3.11), so it lives
in its own venv (`sparsec backends install deepsparse`, see runtimes/venvs.py) and runs in
`runtimes/deepsparse_worker.py`, a persistent process that speaks length-prefixed messages over its
stdin/stdout (JSON headers + `np.save` arrays, no pickle). The engine can abort the whole process on
some graphs: that is reported as a `DeepSparseWorkerError` with the exit status and the stderr tail; a
worker that does not answer within the timeout is killed and reaped.

`prepare()` writes the variant the engine runs fast: static input shapes (batch × sequence), ONNX IR
version ≤ 9 (the engine refuses IR 10) and opset 17 (≤ 19 loads; onnx 1.14 reads no newer), model-local
functions inlined, unused opset domains dropped, nodes of foreign domains refused by name.
Facts (DESIGN.md §5): ORT-style QDQ int8 graphs run *slower* than fp32 on it; QLinearMatMul
(QOperator) int8 graphs run fast. Licence: evaluation only (see `licence_notice`).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from compiler.errors import SparsecError
from compiler.lowering.format import MAX_IR_VERSION, OPSET
from compiler.registry import register_backend
from runtimes.base import Backend, Runner, RunnerOptions, process_cpu_seconds
from runtimes.deepsparse_worker import encode_message, read_message
from runtimes.venvs import DEEPSPARSE, venv_dir, venv_python, venv_status, worker_env

TARGET_OPSET = OPSET  # what the lowering exports; the engine's fast path is known to handle it
MAX_LOADABLE_OPSET = 19  # the engine (and the worker's onnx 1.14) still load 18-19
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
WORKER = Path(__file__).with_name("deepsparse_worker.py")
EXTERNAL_DATA_BYTES = 1_500_000_000
PROTOBUF_LIMIT = 2**31 - 1
PREPARE_NOTES = "deepsparse.json"  # written by prepare() beside the model; the runner reports its notes
MIN_SPARSITY_FOR_ANALYSIS = 0.05  # below this, `details` skips the (one extra compile) kernel analysis
# DeepSparse's banner and the hex dumps of its native backtraces: useless in a one-line error
_NOISE = re.compile(r"^(DeepSparse, Copyright|\[[0-9a-f]+\]$|\d+# 0x|Please email)")


class DeepSparseError(SparsecError):
    """DeepSparse rejected a model or a request."""


class DeepSparseWorkerError(DeepSparseError):
    """The worker process crashed, hung, or broke the protocol."""


# ---------------------------------------------------------------- prepare: pure graph rewrites


def _env_seconds(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SparsecError(f"{var} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise SparsecError(f"{var} must be > 0, got {raw}")
    return value


def check_domains(model) -> list[str]:
    """Refuse nodes from non-standard opset domains (naming the first one); drop unused imports.
    Returns the dropped domain names."""
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise DeepSparseError(
                f"node '{node.name or node.output[0]}' ({node.domain}::{node.op_type}) uses opset domain "
                f"'{node.domain}', which DeepSparse cannot run; lower without runtime-specific fusions "
                "(e.g. onnxruntime's com.microsoft ops)")
    keep = [op for op in model.opset_import if op.domain in STANDARD_DOMAINS]
    dropped = [op.domain for op in model.opset_import if op.domain not in STANDARD_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return dropped


def default_opset(model) -> int:
    return next((op.version for op in model.opset_import if op.domain in STANDARD_DOMAINS), 1)


def downgrade(model):
    """Opset ≤ TARGET_OPSET and IR version ≤ MAX_IR_VERSION. Returns (model, notes)."""
    notes = []
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
        notes.append("inlined model-local functions")
    opset = default_opset(model)
    if opset > TARGET_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
            notes.append(f"converted opset {opset} -> {TARGET_OPSET}")
        except Exception as exc:  # noqa: BLE001 - onnx raises several types here
            reason = " ".join(str(exc).split())[:300]
            if opset > MAX_LOADABLE_OPSET:
                raise DeepSparseError(f"cannot convert opset {opset} to {TARGET_OPSET} for DeepSparse "
                                      f"(it loads opset <= {MAX_LOADABLE_OPSET}): {reason}") from exc
            notes.append(f"kept opset {opset} (conversion to {TARGET_OPSET} failed: {reason})")
    if model.ir_version > MAX_IR_VERSION:
        _refuse_newer_types(model)
        notes.append(f"IR version {model.ir_version} -> {MAX_IR_VERSION}")
        model.ir_version = MAX_IR_VERSION
    return model, notes


def _refuse_newer_types(model) -> None:
    """IR 10 added 4-bit types; a graph using them cannot be relabelled IR 9."""
    from onnx import TensorProto

    newer = {getattr(TensorProto, n) for n in ("UINT4", "INT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}
    for init in model.graph.initializer:
        if init.data_type in newer:
            raise DeepSparseError(f"initializer '{init.name}' uses a 4-bit type (IR ≥ 10); DeepSparse reads IR ≤ 9")


def make_static(model, batch_size: int, seqlen: int) -> list[str]:
    """Fix symbolic input dims: axis 0 -> batch_size, axis 1 -> seqlen; any other symbolic axis is
    refused. Output and intermediate shapes are re-inferred. Returns notes."""
    import onnx

    initializers = {i.name for i in model.graph.initializer}
    notes = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis > 1:
                raise DeepSparseError(
                    f"input '{inp.name}' has a symbolic axis {axis} ('{dim.dim_param or '?'}'); the DeepSparse "
                    "backend fixes only batch (axis 0) and sequence (axis 1) — KV-cache graphs are not supported")
            label = dim.dim_param or "?"
            dim.Clear()
            dim.dim_value = batch_size if axis == 0 else seqlen
            notes.append(f"{inp.name}[{axis}] '{label}' -> {dim.dim_value}")
    if model.ByteSize() >= PROTOBUF_LIMIT:  # in-memory shape inference cannot serialize it
        return [*notes, "output shapes not re-inferred (model > 2 GB); the engine infers them"]
    original = {o.name: onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in model.graph.output}
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    for out in inferred.graph.output:  # keep the original (symbolic) shape where inference gave none
        model.graph.output.append(out if out.type.tensor_type.HasField("shape") else original[out.name])
    model.graph.value_info.extend(inferred.graph.value_info)
    return notes


def int8_notes(model) -> list[str]:
    """Int8 forms DeepSparse runs slowly: QDQ (slower than fp32) and QLinearMatMul with per-channel
    weight scales (left to its naive fallback: supported-op fraction 0.58 vs 0.89 per-tensor on
    MiniLM, measured)."""
    notes = []
    ops = [n.op_type for n in model.graph.node]
    qdq = sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops)
    if qdq and not any(op in ("QLinearMatMul", "MatMulInteger") for op in ops):
        notes.append(f"QDQ int8 graph ({qdq} Q/DQ nodes): DeepSparse runs these slower than fp32; "
                     "use the int8 QOperator (QLinearMatMul) variant instead")
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    per_channel = [n.name or n.output[0] for n in model.graph.node
                   if n.op_type == "QLinearMatMul" and sizes.get(n.input[4], 1) > 1]
    if per_channel:
        notes.append(f"{len(per_channel)} QLinearMatMul nodes (e.g. '{per_channel[0]}') have per-channel weight "
                     "scales: DeepSparse runs these in its slow fallback; quantize weights per-tensor for it")
    return notes


# ---------------------------------------------------------------- worker process


class WorkerProcess:
    """One worker process with deadline-bound, length-prefixed request/response exchanges."""

    def __init__(self, python: Path, timeout_s: float, script: Path = WORKER):
        """`script`: the worker program (runtimes/decode/deepsparse_loop_server.py extends the default one)."""
        self._stderr = tempfile.TemporaryFile(prefix="sparsec-deepsparse-", suffix=".log")
        self.proc = subprocess.Popen(
            [str(python), "-I", str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, env=worker_env(), start_new_session=True)
        self._finalizer = weakref.finalize(self, _reap, self.proc)
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # one exchange at a time: a server may call from several threads

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, header: dict, arrays: dict[str, np.ndarray] | None = None,
                timeout_s: float | None = None) -> tuple[dict, dict[str, np.ndarray]]:
        with self._lock:
            return self._exchange(header, arrays, timeout_s)

    def _exchange(self, header: dict, arrays: dict[str, np.ndarray] | None,
                  timeout_s: float | None) -> tuple[dict, dict[str, np.ndarray]]:
        op = header.get("op", "?")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        if self.proc.poll() is not None:
            raise self._crashed(op)
        try:
            self._write_all(encode_message(header, arrays), deadline)
            reply, out = read_message(lambda n: self._read_exact(n, deadline))
        except TimeoutError:
            self.kill()
            raise DeepSparseWorkerError(
                f"DeepSparse worker did not answer '{op}' within {timeout_s:g} s; killed it (pid {self.pid}). "
                f"Raise the limit with SPARSEC_DEEPSPARSE_TIMEOUT (load: SPARSEC_DEEPSPARSE_LOAD_TIMEOUT)") from None
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise self._crashed(op) from None
        except ValueError as exc:  # garbage on the pipe: a protocol error
            self.kill()
            raise DeepSparseWorkerError(f"DeepSparse worker broke the protocol during '{op}': {exc}; {self.stderr_tail()}") from None
        except BaseException:  # e.g. Ctrl-C mid-exchange: the pipe is out of step, the worker unusable
            self.kill()
            raise
        if not reply.get("ok"):
            raise DeepSparseError(f"DeepSparse failed to {op}: {reply.get('error', 'unknown error')}")
        return reply, out

    def _wait(self, fd: int, writable: bool, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        poller = select.poll()  # not select(): a server may hold more than 1024 descriptors
        poller.register(fd, select.POLLOUT if writable else select.POLLIN)
        if not poller.poll(remaining * 1e3):
            raise TimeoutError  # hang-up and errors do wake poll(): the read/write then reports them

    def _write_all(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self._wait(self._in, True, deadline)
            try:
                view = view[os.write(self._in, view):]
            except BlockingIOError:
                continue

    def _read_exact(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._wait(self._out, False, deadline)
            try:
                chunk = os.read(self._out, min(n - len(buf), 1 << 22))
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _crashed(self, op: str) -> DeepSparseWorkerError:
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        status = f"killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit status {rc}"
        return DeepSparseWorkerError(f"DeepSparse worker died during '{op}' ({status}): {self.stderr_tail()}")

    def stderr_tail(self, limit: int = 1500) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - limit))
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln and not _NOISE.match(ln)]
        return "stderr: " + (" | ".join(lines[-6:]) if lines else "(empty)")

    def kill(self) -> None:
        _reap(self.proc)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"op": "close"}, timeout_s=5)
                self.proc.wait(timeout=5)
            except (DeepSparseError, subprocess.TimeoutExpired):
                pass
        self._finalizer()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                stream.close()
            except OSError:
                pass


def _reap(proc: subprocess.Popen) -> None:
    """Kill (if still running) and wait, so no zombie is left behind."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
        pass


class DeepSparseRunner(Runner):
    """A model compiled by DeepSparse inside a worker process. `info` holds what the engine reported."""

    def __init__(self, python: Path, model_path: Path, options: RunnerOptions, load_timeout_s: float, infer_timeout_s: float):
        self.options = options
        self._worker = WorkerProcess(python, infer_timeout_s)
        try:
            self.info, _ = self._worker.request(
                {"op": "load", "model": str(Path(model_path).resolve()), "batch_size": options.batch_size,
                 "seqlen": options.seqlen, "threads": options.threads}, timeout_s=load_timeout_s)
        except BaseException:
            self._worker.close()
            raise
        self.info = {k: v for k, v in self.info.items() if k not in ("ok", "arrays")}
        self.input_names = tuple(self.info["input_names"])
        self.output_names = tuple(self.info["output_names"])
        self.input_shapes = {n: tuple(s) for n, s in zip(self.input_names, self.info["input_shapes"])}
        self.load_timeout_s = load_timeout_s
        sidecar = Path(model_path).with_name(PREPARE_NOTES)
        self.prepare_notes = json.loads(sidecar.read_text()).get("notes", []) if sidecar.is_file() else []
        self.last_engine_ms = 0.0
        self._kernels: dict[str, Any] | None = None

    def cpu_seconds(self) -> float:
        """CPU time of the worker process (all its threads): the model runs there, not in this process."""
        return process_cpu_seconds(self._worker.pid)

    @property
    def pid(self) -> int:
        return self._worker.pid

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            if arr.shape != self.input_shapes[name]:
                raise DeepSparseError(
                    f"input '{name}' has shape {arr.shape} but the DeepSparse engine was compiled for "
                    f"{self.input_shapes[name]} (static shapes: prepare with this batch size and seqlen)")
            arrays[name] = arr
        reply, outputs = self._worker.request({"op": "run"}, arrays)
        self.last_engine_ms = float(reply.get("engine_ms", 0.0))
        return outputs

    @property
    def details(self) -> dict[str, Any]:
        """What verification reports about the runtime. `sparse_kernels` comes from the engine's own
        per-layer analysis, asked only when the weights hold zeros (a dense graph cannot use them)."""
        kernels = self.sparse_kernels() if self.info["weight_sparsity"] >= MIN_SPARSITY_FOR_ANALYSIS else None
        return {"engine": f"deepsparse {self.info['version']}", "precision": self.info["precision"],
                "threads": self.options.threads, "static_shape": [self.options.batch_size, self.options.seqlen],
                "weight_sparsity": round(self.info["weight_sparsity"], 4),
                "fraction_of_supported_ops": self.info["fraction_of_supported_ops"],
                "sparse_kernels": bool(kernels and kernels["used"]),
                "sparse_layers": kernels["sparse_layers"] if kernels else 0,
                "prepare_notes": self.prepare_notes,
                "licence": "evaluation only (Neural Magic DeepSparse Community License)"}

    def sparse_kernels(self) -> dict[str, Any]:
        """Which layers DeepSparse compiled with sparse kernels (its debug-analysis engine: one extra
        compile, so asked for on demand). {"sparse_layers": n, "layers": n, "by_layer": {name: sparsity}}."""
        if self._kernels is None:
            reply, _ = self._worker.request({"op": "analyze"}, timeout_s=self.load_timeout_s)
            by_layer = {e["layer"]: e["kernel_sparsity"] for e in reply["sparse_layers"]}
            gemms = [e for e in reply["layers"] if e["layer"] not in ("", "<none>")]
            self._kernels = {"used": bool(by_layer), "sparse_layers": len(by_layer), "layers": len(gemms), "by_layer": by_layer}
        return self._kernels

    def close(self) -> None:
        self._worker.close()


# ---------------------------------------------------------------- backend


@register_backend
@dataclass(frozen=True)
class DeepSparseBackend(Backend):
    """DeepSparse (CPU, unstructured-sparse fp32 and int8 kernels), in its own venv and process."""

    name: ClassVar[str] = "deepsparse"
    device: ClassVar[str] = "cpu"
    install_hint: ClassVar[str] = "sparsec backends install deepsparse"
    licence_notice: ClassVar[str | None] = DEEPSPARSE.licence_notice
    dynamic_shapes: ClassVar[bool] = False
    # QLinearMatMul: DeepSparse runs QDQ int8 slower than fp32 (docs/deepsparse.md)
    quant_forms: ClassVar[Mapping[str, str]] = {"int8": "int8-qoperator", "int8-dynamic": "int8-qoperator"}
    lowered_by_default: ClassVar[bool] = True
    load_timeout_s: float = field(default_factory=lambda: _env_seconds("SPARSEC_DEEPSPARSE_LOAD_TIMEOUT", 900.0))
    infer_timeout_s: float = field(default_factory=lambda: _env_seconds("SPARSEC_DEEPSPARSE_TIMEOUT", 120.0))

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(ok, reason); the install command is `install_hint` (callers print both)."""
        return venv_status(DEEPSPARSE)

    def prepare(self, onnx_path: Path, out_dir: Path, options: RunnerOptions) -> Path:
        import onnx

        model = onnx.load(str(onnx_path))
        notes = [f"dropped unused opset domain '{d}'" for d in check_domains(model)]
        model, converted = downgrade(model)
        notes += converted + make_static(model, options.batch_size, options.seqlen)
        notes += int8_notes(model)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.onnx"
        big = model.ByteSize() > EXTERNAL_DATA_BYTES
        onnx.save(model, str(path), save_as_external_data=big, location="model.onnx.data" if big else None)
        (out_dir / PREPARE_NOTES).write_text(json.dumps({
            "source": str(onnx_path), "batch_size": options.batch_size, "seqlen": options.seqlen,
            "ir_version": model.ir_version, "opset": default_opset(model), "notes": notes}, indent=2))
        return path

    def runner(self, model_path: Path, options: RunnerOptions) -> DeepSparseRunner:
        ok, reason = self.available()
        if not ok:
            from compiler.errors import BackendUnavailable

            raise BackendUnavailable(f"backend 'deepsparse' is not available: {reason}; install: {self.install_hint}")
        return DeepSparseRunner(venv_python(venv_dir(DEEPSPARSE)), Path(model_path), options,
                                self.load_timeout_s, self.infer_timeout_s)

    def decoder(self, model_path: Path, lowering: dict[str, Any], options: Any, workdir: Path) -> Any:
        """Causal LMs decode in the worker process, on fixed-shape prefill/decode graphs, with the loop
        beside the engines (runtimes/decode/deepsparse_decoder.py): the KV cache never crosses the pipe."""
        from runtimes.decode.deepsparse_decoder import DeepSparseDecoder

        return DeepSparseDecoder(self, Path(model_path), lowering, options, Path(workdir))

    def check_graph(self, model_path: Path) -> None:
        """Opset domains and 4-bit types DeepSparse cannot read, from the graph without its weights."""
        import onnx

        path = Path(model_path)
        if not path.is_file():
            return
        model = onnx.load(str(path), load_external_data=False)
        check_domains(model)
        if model.ir_version > MAX_IR_VERSION:
            _refuse_newer_types(model)

    def engine_graph(self, model: Any) -> Any:
        """DeepSparse's own graph rules (domains, IR <= 9, opset <= 17) applied to an ONNX model, as `prepare` does."""
        check_domains(model)
        return downgrade(model)[0]

    def worker_process(self, script: Path) -> WorkerProcess:
        """A worker process in the DeepSparse venv running `script` (a `deepsparse_worker.Worker` program)."""
        return WorkerProcess(venv_python(venv_dir(DEEPSPARSE)), self.infer_timeout_s, script=script)

    @property
    def min_sparsity_for_analysis(self) -> float:
        return MIN_SPARSITY_FOR_ANALYSIS

