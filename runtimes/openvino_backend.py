"""OpenVINO (CPU): reads the lowered ONNX directly.

- Precision: on CPUs with AMX/AVX512-BF16, OpenVINO's default inference precision for fp32 graphs is
  bf16; the runner records the precision the compiled model reports (`INFERENCE_PRECISION_HINT`) and
  the runtime precision of its FullyConnected layers. `precision="f32"` in the options forces fp32.
- int8: QDQ graphs (`int8-qdq`, or NNCF's `int8-openvino`) run on OpenVINO's int8 kernels.
- int4: NNCF weight compression (`int4-openvino`: MatMulNBits, which OpenVINO reads as u4 weight
  constants and runs on its compressed-weight FullyConnected kernels); `int4-matmulnbits` without NNCF.
- Sparsity: `CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE` lets the CPU plugin store int8 weights packed
  (only non-zeros) and decompress them in the kernel. OpenVINO does not report which layers it
  packed, so `sparse_kernels` is computed from the plugin's own rule (source: intel_cpu
  FullyConnected::useSparseWeightsDecompression): AMX present, u8/i8 activations, 2-D int8 weight
  with both dims multiples of 64, zero fraction ≥ the rate. fp32/bf16 graphs never qualify.
- Shapes: `runner()` keeps the graph's dynamic shapes (the server batches varying lengths);
  `prepare()` — what verification and benchmarks call — writes an OpenVINO IR reshaped to the static
  (batch, seqlen) of the run for encoders (its faster path: 29 vs 33 ms on MiniLM); causal LMs stay
  dynamic (prefill and decode share one compiled model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compiler.registry import register_backend
from runtimes.base import Backend, Runner, RunnerOptions

SPARSE_RATE = 0.5  # layers with at least this fraction of zero int8 weights are stored packed


def has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return "amx_int8" in flags


def sparse_eligible_layers(model_path: Path, rate: float) -> dict[str, Any]:
    """Which MatMul weights OpenVINO's CPU plugin would store packed-sparse, by its own rule."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    eligible, int8_layers = 0, 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.INT8 or len(init.dims) != 2:
            continue
        if not any(c.op_type in ("DequantizeLinear", "QLinearMatMul", "MatMulInteger") for c in consumers.get(init.name, [])):
            continue
        int8_layers += 1
        rows, cols = init.dims
        if rows % 64 or cols % 64:
            continue
        w = numpy_helper.to_array(init)
        if float((w == 0).mean()) >= rate:
            eligible += 1
    return {"int8_weights": int8_layers, "eligible": eligible}


def port_name(port: Any, graph_names: set[str]) -> str:
    """A port's name as the ONNX graph spells it (OpenVINO may attach aliases such as
    '/Concat_output_0' to an input tensor, and `get_any_name()` may pick one)."""
    names = port.get_names()
    return next((n for n in sorted(names) if n in graph_names), None) or \
        next((n for n in sorted(names) if not n.startswith("/")), port.get_any_name())


def onnx_io_names(path: Path) -> set[str]:
    import onnx

    if path.suffix != ".onnx":
        return set()
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name for v in (*graph.input, *graph.output)}


class OpenVinoRunner(Runner):
    def __init__(self, compiled: Any, details: dict[str, Any], graph_names: set[str]):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = tuple(port_name(i, graph_names) for i in compiled.inputs)
        self.output_names = tuple(port_name(o, graph_names) for o in compiled.outputs)
        self.details = details

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.request.infer({i: feeds[n] for i, n in enumerate(self.input_names)})
        return {name: np.asarray(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}


@register_backend
class OpenVinoBackend(Backend):
    """OpenVINO CPU plugin."""

    name = "openvino"
    device = "cpu"
    install_hint = "pip install 'sparsec[openvino]'  (openvino, nncf)"
    # int8-qdq runs on its int8 AMX kernels (never MatMulInteger: fp32 kernels there, 4x slower)
    quant_forms = {"int8": "int8-qdq", "int8-dynamic": "int8-qdq", "int4": "int4-matmulnbits"}
    lowered_by_default = True
    distributions = ("openvino",)
    # int4 weight-only by OpenVINO's own tool (NNCF, in the `openvino` extra), timed beside dense fp32
    dense_alternatives = {"int4-openvino": "int4"}

    @classmethod
    def quant_form(cls, scheme: str, requested: bool) -> str | None:
        """OpenVINO's own tool (NNCF) when OpenVINO is requested and NNCF is installed (int8: quantization,
        int4: weight compression), else QDQ int8 / onnxruntime's MatMulNBits int4."""
        import importlib.util

        if scheme in cls.quant_forms and requested and importlib.util.find_spec("nncf") is not None:
            return "int4-openvino" if scheme == "int4" else "int8-openvino"
        return super().quant_form(scheme, requested)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as exc:
            return False, f"openvino is not importable ({exc})"
        devices = ov.Core().available_devices
        if "CPU" not in devices:
            return False, f"openvino {ov.__version__} sees no CPU device (devices: {devices})"
        return True, f"openvino {ov.get_version().split('-')[0]} (CPU{', AMX' if has_amx() else ''})"

    def __init__(self) -> None:
        self._sources: dict[Path, Path] = {}  # static IR written by prepare() -> the ONNX it came from

    def prepare(self, onnx_path: Path, out_dir: Path, options: RunnerOptions) -> Path:
        """Encoders: an OpenVINO IR with static (batch, seqlen) inputs; causal LMs: the ONNX as is."""
        import openvino as ov

        from compiler.lowering.rules import explain_rejection

        try:
            model = ov.Core().read_model(str(onnx_path))
            if any(i.get_any_name().startswith("past_key_values.") for i in model.inputs):
                return onnx_path
            model.reshape({i.get_any_name(): ov.PartialShape([options.batch_size, options.seqlen]) for i in model.inputs
                           if i.get_partial_shape().rank.get_length() == 2})
            out_dir.mkdir(parents=True, exist_ok=True)
            xml = out_dir / "model.xml"
            ov.save_model(model, str(xml), compress_to_fp16=False)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with multi-line text
            raise explain_rejection(self.name, Path(onnx_path), exc) from exc
        self._sources[xml] = Path(onnx_path)
        return xml

    def runner(self, model_path: Path, options: RunnerOptions, precision: str | None = None,
               sparse_rate: float = SPARSE_RATE) -> OpenVinoRunner:
        compiled, details, names = self._compile(Path(model_path), options, precision, sparse_rate, stateful=False)
        return OpenVinoRunner(compiled, details, names)

    def stateful_runner(self, model_path: Path, options: RunnerOptions, precision: str | None = None,
                        sparse_rate: float = SPARSE_RATE) -> "OpenVinoStatefulRunner":
        """A causal LM with its KV cache kept inside the infer request (OpenVINO's `make_stateful`: each
        `past_key_values.*` input becomes a ReadValue, its `present.*` output an Assign) — the form
        openvino-genai runs: no cache crosses the Python boundary per token."""
        compiled, details, names = self._compile(Path(model_path), options, precision, sparse_rate, stateful=True)
        return OpenVinoStatefulRunner(compiled, {**details, "stateful": True}, names)

    def decoder(self, model_path: Path, lowering: dict[str, Any], options: Any, workdir: Path) -> Any:
        """Causal LMs decode on the stateful model (runtimes/decode/openvino_stateful.py) unless a cache
        form was asked for explicitly (`cache="dynamic"|"static"`: the generic in-process decoders)."""
        if getattr(options, "cache", "auto") not in ("auto", "stateful"):
            return None
        from runtimes.decode.openvino_stateful import StatefulDecoder

        return StatefulDecoder(self, Path(model_path), lowering, options)

    def _compile(self, model_path: Path, options: RunnerOptions, precision: str | None, sparse_rate: float,
                 stateful: bool) -> tuple[Any, dict[str, Any], set[str]]:
        import openvino as ov

        from compiler.lowering.rules import explain_rejection

        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": options.threads, "NUM_STREAMS": 1,
                                  "PERFORMANCE_HINT": "LATENCY", "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE": sparse_rate}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        source = self._sources.get(model_path, model_path)
        names = onnx_io_names(source)
        try:
            model = core.read_model(str(model_path))
            if stateful:
                make_stateful(model, names)
            static = all(i.get_partial_shape().is_static for i in model.inputs)
            compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with multi-line text
            raise explain_rejection(self.name, source, exc) from exc
        fc = _fc_precisions(compiled)
        sparse = sparse_eligible_layers(source, sparse_rate)
        amx = has_amx()
        details = {
            "precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: '", "").replace("'>", ""),
            "fully_connected": fc,
            "static_shapes": static,
            "threads": options.threads,
            "sparse_weights_decompression_rate": sparse_rate,
            "sparse_kernels": bool(amx and sparse["eligible"]),
            "sparse_layers_eligible": sparse["eligible"],
            "int8_weights": sparse["int8_weights"],
            "amx": amx,
        }
        return compiled, details, names


def make_stateful(model: Any, graph_names: set[str]) -> int:
    """Turn each `past_key_values.X` input / `present.X` output pair of a causal LM into one state
    variable (in place); returns the number of pairs. The states start empty: `OpenVinoStatefulRunner.reset`
    sizes them for a batch before each prefill."""
    from openvino._offline_transformations import apply_make_stateful_transformation

    outputs = {port_name(o, graph_names): o.get_any_name() for o in model.outputs}
    pairs = {}
    for port in model.inputs:
        name = port_name(port, graph_names)
        if name.startswith("past_key_values."):
            present = outputs.get("present." + name[len("past_key_values."):])
            if present is None:
                raise RuntimeError(f"input {name} has no matching present.* output to make the cache stateful")
            pairs[port.get_any_name()] = present
    apply_make_stateful_transformation(model, pairs)
    return len(pairs)


class OpenVinoStatefulRunner(Runner):
    """One infer request of a stateful causal LM: `reset(batch)` empties the cache for a new batch,
    `keep(rows)` drops finished rows from it, `infer` feeds input_ids / attention_mask (past + new) /
    position_ids and returns the logits; the cache grows inside the request."""

    def __init__(self, compiled: Any, details: dict[str, Any], graph_names: set[str]):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = tuple(port_name(i, graph_names) for i in compiled.inputs)
        self.logits = next(o for o in compiled.outputs if port_name(o, graph_names) == "logits")
        self.details = details

    def reset(self, batch: int) -> None:
        import openvino as ov

        for state in self.request.query_state():
            shape = list(state.state.shape)
            shape[0], shape[2] = batch, 0  # (batch, kv_heads, seq, head_dim)
            state.state = ov.Tensor(np.zeros(shape, dtype=state.state.data.dtype))

    def keep(self, rows: list[int]) -> None:
        import openvino as ov

        for state in self.request.query_state():
            data = state.state.data
            if len(rows) != data.shape[0]:
                state.state = ov.Tensor(np.ascontiguousarray(data[rows]))

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.request.infer({i: feeds[n] for i, n in enumerate(self.input_names)})
        return {"logits": np.asarray(result[self.logits])}


def _fc_precisions(compiled: Any) -> dict[str, int]:
    """Count of FullyConnected/MatMul layers per (kernel, runtime precision) in the executable graph."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = {k: v.astype(str) for k, v in op.get_rt_info().items() if k in ("layerType", "primitiveType", "runtimePrecision")}
        if info.get("layerType") in ("FullyConnected", "MatMul"):
            key = f"{info['layerType']}:{info.get('primitiveType')}:{info.get('runtimePrecision')}"
            counts[key] = counts.get(key, 0) + 1
    return counts
