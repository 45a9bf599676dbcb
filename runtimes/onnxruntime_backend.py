"""onnxruntime (CPU): always available, the dense reference runtime.

ORT's CPU kernels are dense: sparsity in an fp32 or int8 graph changes nothing but the compressed
size, and verification reports it so (`sparse_kernels: false`). Its fast dense path is int8 —
MatMulInteger from `quantize_dynamic` (`int8-dynamic`) or QDQ (`int8-qdq`), see compiler/lowering/quant.py;
int4 weight-only runs as MatMulNBits (`int4-matmulnbits`, compiler/lowering/int4.py).
Sessions run sequentially with `intra_op_num_threads = threads` and one inter-op thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compiler.lowering.files import GQA_FILE
from compiler.registry import register_backend
from runtimes.base import Backend, Runner, RunnerOptions


class OnnxRuntimeRunner(Runner):
    def __init__(self, session: Any, options: RunnerOptions):
        self.session = session
        self.options = options
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())
        self._int_inputs = {i.name for i in session.get_inputs() if "int" in i.type}
        self.details = {"providers": session.get_providers(), "precision": "as in the graph",
                        "sparse_kernels": False, "threads": options.threads, "intra_op_spinning": False}

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {n: (feeds[n].astype(np.int64) if n in self._int_inputs else feeds[n]) for n in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, inputs)))


@register_backend
class OnnxRuntimeBackend(Backend):
    """onnxruntime CPUExecutionProvider."""

    name = "onnxruntime"
    device = "cpu"
    install_hint = "pip install onnxruntime"
    quant_forms = {"int8": "int8-qdq", "int8-dynamic": "int8-dynamic", "int4": "int4-matmulnbits",
                   "int8-weight": "int8-matmulnbits"}
    lowered_by_default = True
    distributions = ("onnxruntime",)
    # the fastest dense int8 form known on onnxruntime (DESIGN §5): MatMulInteger on every block layer;
    # int4 weight-only (MatMulNBits), what a CPU LLM user picks first, and 8-bit weight-only, the dense int8
    # of openvino-genai's accuracy (issue 13)
    dense_alternatives = {"int8-dynamic": "int8-dynamic", "int4-matmulnbits": "int4", "int8-matmulnbits": "int8-weight"}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return False, f"onnxruntime is not importable ({exc})"
        return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def runner(self, model_path: Path, options: RunnerOptions) -> OnnxRuntimeRunner:
        import onnxruntime as ort

        from compiler.lowering.rules import explain_rejection

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # No idle spinning: after a run, ORT's intra-op threads otherwise spin and steal the cores the next
        # session (verification rotates several) or another process needs. Measured (issue 13, BERT-base,
        # 5 sessions round-robin): int8-dynamic p50 79.7 ms spinning vs 45.5 ms without; fp32 163.0 vs 131.8.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise explain_rejection(self.name, Path(model_path), exc) from exc
        return OnnxRuntimeRunner(session, options)

    def decoder(self, model_path: Path, lowering: dict[str, Any], options: Any, workdir: Path) -> Any:
        """`cache="auto"` on a graph with the fused decode graph beside it (`decode_gqa.onnx`, Llama-family
        LMs): that graph, its KV cache updated in place (runtimes/decode/onnxruntime_gqa.py; SmolLM2 8-bit
        weights, paired: 1.40x [1.31, 1.48] the tokens/s of the portable graph, docs/measurement.md).
        Otherwise the growing-cache decoder with the KV cache bound between steps (IO binding); the
        generic decoders for fixed-shape graphs or `io_binding=False`."""
        fused = Path(model_path).parent / GQA_FILE
        if options.cache == "auto" and options.io_binding and fused.is_file():
            from runtimes.decode.onnxruntime_gqa import GQADecoder

            return GQADecoder(self, fused, lowering, options)
        if options.cache_for(self) != "dynamic" or not options.io_binding:
            return None
        from runtimes.decode.onnxruntime_bound import BoundDynamicDecoder

        return BoundDynamicDecoder(self, model_path, lowering, options, workdir)
