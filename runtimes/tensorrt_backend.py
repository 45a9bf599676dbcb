"""TensorRT (NVIDIA GPU): the 2:4 backend — sparse tensor cores via `BuilderFlag.SPARSE_WEIGHTS`.

`prepare()` builds an engine from the lowered ONNX (fp16, + int8 when the graph carries QDQ nodes:
the `int8-qdq-sym` variant, explicit quantization with zero points 0) with one optimization profile
covering batch 1..B and sequence 1..S, and records which layers ran sparse, in two ways TensorRT
offers: the builder's own log lines ("Layers eligible for sparse math", "picked sparse
implementation for layers") and the engine inspector's per-layer tactic names. A weight is eligible
only when every group of 4 along its input (reduction) axis holds ≤ 2 non-zeros — what
`nm-structure{n=2,m=4}` plans — and the GPU is Ampere or newer.

NOT TESTED HERE: the development machines have no GPU and the `tensorrt` wheel cannot be fetched
from them; `available()` says so and gives the install command. Host↔device copies use cuda-python
(`cuda.cudart`), so torch's CUDA build is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from compiler.registry import register_backend
from runtimes.base import Backend, Runner, RunnerOptions

INSTALL = "pip install tensorrt cuda-python  (needs an NVIDIA GPU with CUDA 12; 2:4 sparse math needs Ampere or newer)"


def _check(result: Any) -> Any:
    """cuda-python returns (err, *values); raise on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def _collecting_logger(trt: Any):
    class Collect(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            self.messages.append(f"{severity}: {msg}")

    return Collect()


def sparse_layers_from_log(messages: list[str]) -> dict[str, list[str]]:
    """Parse TensorRT's builder log: layers eligible for sparse math, and those it picked sparse for."""
    out: dict[str, list[str]] = {"eligible": [], "picked": []}
    for msg in messages:
        text = msg.split(": ", 1)[-1]
        for key, marker in (("eligible", "Layers eligible for sparse math:"),
                            ("picked", "picked sparse implementation for layers:")):
            if marker in text:
                names = text.split(marker, 1)[1]
                out[key] += [n.strip() for n in names.split(",") if n.strip()]
    return out


def sparse_tactics(engine: Any, trt: Any) -> list[str]:
    """Layers whose chosen tactic is a sparse kernel, from the engine inspector (detailed profiling)."""
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    return [str(layer.get("Name")) for layer in layers
            if isinstance(layer, dict) and "sparse" in str(layer.get("TacticName", "")).lower()]


def has_qdq(onnx_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


class TensorRtRunner(Runner):
    def __init__(self, engine: Any, trt: Any, details: dict[str, Any]):
        from cuda import cudart

        self.trt = trt
        self.cudart = cudart
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = _check(cudart.cudaStreamCreate())
        self.details = details

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self.cudart, self.trt
        buffers = []
        try:
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name].astype(trt.nptype(self.engine.get_tensor_dtype(name))))
                self.context.set_input_shape(name, host.shape)
                dev = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                buffers.append(dev)
                _check(cudart.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                self.context.set_tensor_address(name, dev)
            hosts = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                dev = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                buffers.append(dev)
                self.context.set_tensor_address(name, dev)
                hosts[name] = (host, dev)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for host, dev in hosts.values():
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            return {name: host.astype(np.float32) for name, (host, _) in hosts.items()}
        finally:
            for dev in buffers:
                cudart.cudaFree(dev)

    def close(self) -> None:
        self.cudart.cudaStreamDestroy(self.stream)


@register_backend
class TensorRtBackend(Backend):
    """TensorRT on an NVIDIA GPU, with 2:4 sparse weights."""

    name = "tensorrt"
    device = "gpu"
    install_hint = INSTALL
    quant_forms = {"int8": "int8-qdq-sym", "int8-dynamic": "int8-qdq-sym"}  # written only when requested

    def __init__(self) -> None:
        self._build_info: dict[Path, dict[str, Any]] = {}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt as trt
        except ImportError:
            return False, "tensorrt is not installed (it needs an NVIDIA GPU; this machine has none)"
        try:
            from cuda import cudart

            count = _check(cudart.cudaGetDeviceCount())
        except ImportError:
            return False, f"tensorrt {trt.__version__} found but cuda-python is missing"
        except Exception as exc:  # noqa: BLE001 - no driver / no device
            return False, f"tensorrt {trt.__version__} found but no CUDA device is usable ({exc})"
        if not count:
            return False, f"tensorrt {trt.__version__} found but no CUDA device"
        props = _check(cudart.cudaGetDeviceProperties(0))
        sparse = "2:4 sparse tensor cores" if props.major >= 8 else "no sparse tensor cores (pre-Ampere)"
        return True, f"tensorrt {trt.__version__} on {props.name.decode(errors='ignore')} (sm_{props.major}{props.minor}, {sparse})"

    def prepare(self, onnx_path: Path, out_dir: Path, options: RunnerOptions) -> Path:
        """Build and serialize an engine: SPARSE_WEIGHTS + FP16 (+ INT8 for QDQ graphs)."""
        import tensorrt as trt

        from compiler.lowering.rules import explain_rejection

        logger = _collecting_logger(trt)
        logger.min_severity = trt.Logger.INFO
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise explain_rejection(self.name, Path(onnx_path), RuntimeError(errors))
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        config.set_flag(trt.BuilderFlag.FP16)
        int8 = has_qdq(Path(onnx_path))
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(tensor.name, *_profile_shapes(tuple(tensor.shape), tensor.name, options))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            tail = " | ".join(m for m in logger.messages if "ERROR" in m)[-400:]
            raise explain_rejection(self.name, Path(onnx_path), RuntimeError(f"engine build failed: {tail}"))
        out_dir.mkdir(parents=True, exist_ok=True)
        engine_path = out_dir / "model.engine"
        engine_path.write_bytes(bytes(serialized))
        self._build_info[engine_path] = {"int8": int8, "fp16": True, "sparse_weights_flag": True,
                                         "sparse_log": sparse_layers_from_log(logger.messages)}
        return engine_path

    def runner(self, model_path: Path, options: RunnerOptions) -> TensorRtRunner:
        import tensorrt as trt

        model_path = Path(model_path)
        if model_path.suffix == ".onnx":
            model_path = self.prepare(model_path, model_path.parent / f".trt-{options.batch_size}x{options.seqlen}", options)
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(model_path.read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize '{model_path}' (built by another TensorRT version?)")
        info = self._build_info.get(model_path, {})
        picked = sparse_tactics(engine, trt)
        log = info.get("sparse_log", {})
        details = {"precision": "int8+fp16" if info.get("int8") else "fp16", "threads": options.threads,
                   "sparse_kernels": bool(picked or log.get("picked")), "sparse_layers": picked[:50],
                   "sparse_eligible_layers": log.get("eligible", [])[:50]}
        return TensorRtRunner(engine, trt, details)


def _profile_shapes(shape: tuple[int, ...], name: str, options: RunnerOptions) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) for an input: batch 1..B, sequence 1..S, KV past 0..S; static dims kept."""
    lo, opt, hi = [], [], []
    for axis, dim in enumerate(shape):
        if dim >= 0:
            lo.append(dim), opt.append(dim), hi.append(dim)
        elif axis == 0:
            lo.append(1), opt.append(options.batch_size), hi.append(options.batch_size)
        elif name.startswith("past_key_values."):
            lo.append(0), opt.append(options.seqlen), hi.append(options.seqlen)
        elif name == "attention_mask":
            lo.append(1), opt.append(options.seqlen), hi.append(2 * options.seqlen)
        else:
            lo.append(1), opt.append(options.seqlen), hi.append(options.seqlen)
    return tuple(lo), tuple(opt), tuple(hi)
