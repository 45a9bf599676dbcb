"""int8 variants of a lowered graph, each in the form its backend runs fast.

The `quantize` pass only decides (`plan[layer].quant = "int8" | "int8-dynamic" | "int4" | "int8-weight"`); here the decision
is materialised with onnxruntime's quantization tools, restricted to the MatMul nodes of the planned
layers (found by module scope, `compiler.lowering.rules.layer_nodes`):

| variant          | format                        | runs on                   | calibration |
|------------------|-------------------------------|---------------------------|-------------|
| `int8-dynamic`   | MatMulInteger (quantize_dynamic) | onnxruntime            | none        |
| `int8-qdq`       | QuantizeLinear/DequantizeLinear, U8 act / S8 weights | onnxruntime, openvino | MinMax |
| `int8-qoperator` | QLinearMatMul (QOperator)     | deepsparse                | MinMax      |
| `int8-qdq-sym`   | QDQ, S8 act (zero point 0) / S8 weights | tensorrt        | MinMax      |
| `int8-openvino`  | QDQ by NNCF (TRANSFORMER preset, SmoothQuant) | openvino    | NNCF        |
| `int4-matmulnbits` | MatMulNBits, int4 weights only (compiler/lowering/int4.py) | onnxruntime | none |
| `int4-openvino`  | MatMulNBits by NNCF `compress_weights` (INT4_ASYM, group 64) | openvino | none    |
| `int8-matmulnbits` | MatMulNBits, 8-bit weights only, blocks of 64 (compiler/lowering/int4.py) | onnxruntime | none |

Scheme `int4` (weight-only) gives onnxruntime `int4-matmulnbits` and OpenVINO `int4-openvino`
(compiler/lowering/int4.py says which settings and why); no other backend runs it. Scheme `int8-weight`
(8-bit weights, float activations: the accuracy of openvino-genai's int8, issue 13) gives onnxruntime
`int8-matmulnbits`; our kernels (`--backend sparsec`) run it as their int8 form; other backends refuse it.
Scheme `int8` (static) gives onnxruntime `int8-qdq`; `int8-dynamic` gives onnxruntime `int8-dynamic`.
OpenVINO gets `int8-openvino` when it is requested and NNCF is installed (OpenVINO's own int8 tool:
on MiniLM it keeps embedding cosine 0.994 vs fp32 with every layer int8, where onnxruntime's MinMax
QDQ reaches 0.943), else `int8-qdq`, which it also runs on its int8 AMX kernels (never MatMulInteger:
OpenVINO runs that on fp32 kernels, 4x slower — measured). DeepSparse always gets `int8-qoperator`
(it runs QDQ int8 *slower* than fp32, QLinearMatMul fast), TensorRT `int8-qdq-sym` when requested.
Weights are quantized symmetrically per output channel (per-tensor loses too much: MiniLM embedding
cosine 0.947 with per-tensor int8-dynamic vs 0.994 per-channel), so every pruned zero stays an
exact int8 zero — except `int8-qoperator`, per tensor: DeepSparse runs per-channel QLinearMatMul in
its dense fallback (no sparse kernels; tiny Llama decode step 0.71 vs 0.45 ms per-tensor, 84% vs 91%
of ops supported), so its only fast sparse int8 form is per-tensor (see docs/decode.md).

Calibration uses the artifact's own calibration samples (`calib.samples`), converted to graph feeds;
when the pipeline had none, a default calibration set is built here and the variant says so.
Gemm nodes (GPT-2 Conv1D, 2-D Linear) are first rewritten as MatMul + Add: ORT's dynamic quantizer
has no Gemm, and its QOperator form of Gemm (QGemm) lives in the com.microsoft domain, which
DeepSparse rejects.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.ir import ModelIR
from compiler.lowering.export import save_onnx
from compiler.lowering.feeds import graph_feeds
from compiler.lowering.files import GQA_FILE, path_rel
from compiler.lowering.format import LoweringError, load_onnx
from compiler.lowering.rules import graph_rules, layer_nodes
from compiler.stats import STATIC_MAX_ACTIVATION_RATIO, activation_ratios

SCHEMES = ("int8", "int8-dynamic", "int4", "int8-weight", "bf16")
# weight-only schemes: no backend runs them without a declared form, so a compile that requests one on
# such a backend is refused up front (`backends_without_form`) instead of silently running fp32 there
WEIGHT_ONLY_SCHEMES = ("int4", "int8-weight", "bf16")
# The form a backend declares for a scheme it lowers itself (`Backend.lower`), with no ONNX variant: bf16
# weights exist only as the sparsec backend's packed bf16 (no maintained ONNX runtime has a bf16-weight,
# fp32-activation MatMul that is faster than fp32 on CPU).
BACKEND_LOWERED = "backend-lowered"


@dataclass(frozen=True)
class VariantKind:
    name: str
    format: str
    calibrated: bool
    symmetric_activations: bool = False
    per_channel: bool = True  # weight scales per output channel (else one per tensor)
    tool: str = "onnxruntime.quantization"
    weight_bits: int = 8
    weight_only: bool = False  # MatMulNBits of `weight_bits` bits (compiler/lowering/int4.py), activations float
    # an onnxruntime format: the same variant of the fused decode graph (`decode_gqa.onnx`, compiler/lowering/gqa.py)
    # is written beside it when the fp32 graph has one (only onnxruntime runs GroupQueryAttention)
    fused_decode: bool = False


# The int8 forms lowering can write. Which backend runs which is declared by the backend itself
# (`Backend.quant_forms`, runtimes/base.py), never listed here.
VARIANTS = {
    "int8-dynamic": VariantKind("int8-dynamic", "MatMulInteger", calibrated=False, fused_decode=True),
    "int8-qdq": VariantKind("int8-qdq", "QDQ", calibrated=True, fused_decode=True),
    "int8-qoperator": VariantKind("int8-qoperator", "QOperator", calibrated=True, per_channel=False),
    "int8-qdq-sym": VariantKind("int8-qdq-sym", "QDQ", calibrated=True, symmetric_activations=True),
    "int8-openvino": VariantKind("int8-openvino", "QDQ (NNCF)", calibrated=True, tool="nncf"),
    "int4-matmulnbits": VariantKind("int4-matmulnbits", "MatMulNBits", calibrated=False, weight_bits=4,
                                    weight_only=True, tool="onnxruntime.quantization.matmul_nbits_quantizer",
                                    fused_decode=True),
    "int4-openvino": VariantKind("int4-openvino", "MatMulNBits (NNCF compress_weights)", calibrated=False,
                                 weight_bits=4, weight_only=True, tool="nncf"),
    "int8-matmulnbits": VariantKind("int8-matmulnbits", "MatMulNBits (8-bit)", calibrated=False, weight_bits=8,
                                    weight_only=True, tool="onnxruntime.quantization.matmul_nbits_quantizer",
                                    fused_decode=True),
}


QUANT_FORMAT = 4  # bump when a variant's settings change: keys the dense int8 references in the cache


def nncf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


def variants_for_scheme(scheme: str, backends: tuple[str, ...] = (), registry: Any = None) -> dict[str, tuple[str, ...]]:
    """Variant name → backends that run it, for a scheme. Each registered backend declares its form
    (`quant_form(scheme, requested)`); a backend's variant is written when it is requested, or when it
    declares `lowered_by_default` (so the artifact can be served on it later without re-lowering)."""
    if scheme not in SCHEMES:
        raise LoweringError(f"unknown quantization scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    if registry is None:
        from compiler.registry import Registry

        registry = Registry.default(kinds=("backend",))
    out: dict[str, list[str]] = {}
    for name, entry in registry.backends.items():
        cls = entry.obj
        requested = name in backends
        if not (requested or getattr(cls, "lowered_by_default", False)):
            continue
        form = cls.quant_form(scheme, requested) if hasattr(cls, "quant_form") else None
        if form is None or form == BACKEND_LOWERED:
            continue
        if form not in VARIANTS:
            raise LoweringError(f"backend '{name}' declares int8 form '{form}', which lowering cannot write "
                                f"(known: {', '.join(VARIANTS)})")
        out.setdefault(form, []).append(name)
    return {v: tuple(out[v]) for v in VARIANTS if v in out}  # a fixed order: the manifest does not depend on the registry's


def backends_without_form(scheme: str, backends: tuple[str, ...], registry: Any) -> list[str]:
    """Requested backends that declare no form for a weight-only scheme (they would run the fp32 graph):
    the compile driver refuses them before loading the model. int8 schemes are not checked: a backend
    may run int8 from its own lowering (`Backend.lower`) without declaring an ONNX variant."""
    if scheme not in WEIGHT_ONLY_SCHEMES:
        return []
    return [b for b in backends if registry.get_backend(b).quant_form(scheme, True) is None]


# the one mixed plan lowering accepts: a weight-only int4 body whose LM head failed the int4 check but
# passed at 8 bits (passes/quantization.py HEAD_FALLBACK); its MatMulNBits variants carry both bit widths
MIXED_WEIGHT_ONLY = {frozenset({"int4", "int8-weight"}): "int4"}


def planned_scheme(ir: ModelIR) -> str | None:
    schemes = {p.quant for p in ir.plan.values() if p.quant}
    if frozenset(schemes) in MIXED_WEIGHT_ONLY:
        return MIXED_WEIGHT_ONLY[frozenset(schemes)]
    if len(schemes) > 1:
        raise LoweringError(f"the plan mixes quantization schemes {sorted(schemes)}: lowering supports one per model")
    return schemes.pop() if schemes else None


def layer_bits(ir: ModelIR, layers: Any, kind: "VariantKind") -> dict[str, int]:
    """Weight bits per planned layer of a weight-only variant: the variant's, or 8 for a head planned
    `int8-weight` inside an int4 plan."""
    return {n: 8 if ir.plan[n].quant == "int8-weight" else kind.weight_bits for n in layers}


def quantized_layers(ir: ModelIR) -> list[str]:
    return [n for n, p in ir.plan.items() if p.quant]


# -- graph preparation -----------------------------------------------------------------------------
def gemm_to_matmul(model: Any) -> int:
    """Rewrite Gemm(A, B[, C]) with a constant B (alpha = beta = 1, transA = 0) as MatMul(A, B or Bᵀ)
    [+ Add C], in place; the MatMul keeps the Gemm's name (scope) so layers still map. Returns count."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = f"{weight}_T"
            if transposed not in inits:
                init = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), transposed)
                model.graph.initializer.append(init)
                inits[transposed] = init
            weight = transposed
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        onnx.checker.check_model(model) if model.ByteSize() < 2**31 else None
    return rewritten


class _FeedReader:
    """onnxruntime CalibrationDataReader over precomputed feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._iter = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:  # pragma: no cover - used by some calibrators
        pass


def calibration_feeds(ir: ModelIR, section: dict[str, Any], calib: Any) -> tuple[list[dict[str, np.ndarray]], dict[str, Any], Any]:
    """Graph feeds from the artifact's calibration samples (or a default set built now), their
    provenance, and the calibration set itself."""
    note = "the artifact's calibration samples"
    if calib is None:
        from compiler.calibration import CalibrationConfig, build_calibration

        calib = build_calibration(ir, CalibrationConfig(samples=16))
        note = "built at lowering (the pipeline used no calibration): default source, 16 samples"
    feeds = []
    for sample in calib.samples:
        arrays = {k: v.detach().cpu().numpy() for k, v in sample.items()}
        if section["task"] == "module":
            feeds.append({k: arrays[k] for k in section["inputs"] if k in arrays})
            continue
        ids = arrays["input_ids"]
        mask = arrays.get("attention_mask", np.ones_like(ids))
        feeds.append(graph_feeds(section, ids, mask))
    info = {"samples": len(feeds), "seqlen": int(getattr(calib, "seqlen", 0) or 0), "method": "MinMax",
            "sha256": getattr(calib, "sha256", None), "source": note}
    return feeds, info, calib


# -- variants --------------------------------------------------------------------------------------
def write_variants(ir: ModelIR, src: Path, root: Path, section: dict[str, Any], scheme: str, calib: Any,
                   wanted: dict[str, tuple[str, ...]], file_name: str = "model.onnx") -> dict[str, dict[str, Any]]:
    """Write `wanted` (variant → backends that run it; `variants_for_scheme`) under
    `root/onnx/<variant>/<file_name>`; returns their manifest entries. When `src` has the fused decode
    graph beside it, the `fused_decode` variants get theirs too (entry key `decode_graph`)."""
    entries = _write_variants(ir, src, root, section, scheme, calib, wanted, file_name)
    fused_src = src.parent / GQA_FILE
    fused = {v: b for v, b in wanted.items() if VARIANTS[v].fused_decode}
    if file_name != GQA_FILE and fused and fused_src.is_file():
        for name, entry in _write_variants(ir, fused_src, root, section, scheme, calib, fused, GQA_FILE).items():
            entries[name]["decode_graph"] = {"file": entry["file"], "layers_quantized": entry["layers_quantized"],
                                             "zeros": entry["zeros"]}
    return entries


def _write_variants(ir: ModelIR, src: Path, root: Path, section: dict[str, Any], scheme: str, calib: Any,
                    wanted: dict[str, tuple[str, ...]], file_name: str) -> dict[str, dict[str, Any]]:
    layers = quantized_layers(ir)
    model = load_onnx(src)
    gemms = gemm_to_matmul(model)
    mapping = layer_nodes(model, layers)
    if not mapping:
        raise LoweringError(f"none of the {len(layers)} layers planned for {scheme} maps to a MatMul node of the graph")
    fp32_nodes = [node for layer, (node, _) in layer_nodes(model, [n for n in ir.layers if n not in set(layers)]).items()]
    node_outputs = {n.name: n.output[0] for n in model.graph.node}
    external = src.with_name(src.name + ".data").exists()
    feeds, cal_info, static_mapping = [], {}, mapping
    if any(VARIANTS[v].calibrated for v in wanted):
        feeds, cal_info, calib = calibration_feeds(ir, section, calib)
        graph_inputs = {i.name for i in model.graph.input}  # the fused graph takes no position_ids
        feeds = [{k: v for k, v in f.items() if k in graph_inputs} for f in feeds]
        if scheme == "int8-dynamic":  # the pass did not screen layers for static int8: do it for these variants
            ratios = activation_ratios(ir, list(mapping), calib.samples)
            static_mapping = {n: v for n, v in mapping.items() if ratios[n] <= STATIC_MAX_ACTIVATION_RATIO}
    entries: dict[str, dict[str, Any]] = {}
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".quant-", dir=root))
    try:
        prepared = work / "prepared.onnx"
        save_onnx(model, prepared, external=external, data_file=prepared.name + ".data")
        for name, runs_on in wanted.items():
            kind = VARIANTS[name]
            out = root / "onnx" / name / file_name
            out.parent.mkdir(parents=True, exist_ok=True)
            used = static_mapping if kind.calibrated and kind.tool != "nncf" else mapping
            if kind.weight_only:
                entries[name] = _write_int4(ir, kind, prepared, out, used, node_outputs, scheme, runs_on, len(layers), gemms,
                                            external)
                continue
            if kind.tool == "nncf":
                _quantize_nncf(prepared, out, fp32_nodes, feeds, external)
            else:
                _quantize(kind, prepared, out, [node for node, _ in used.values()], feeds, external)
            qmodel = load_onnx(out)
            failed = [c for c in graph_rules(qmodel) if not c["ok"]]
            if failed:
                raise LoweringError(f"variant '{name}' breaks rule '{failed[0]['rule']}': {failed[0]['detail']}")
            entries[name] = {
                "file": path_rel(out), "format": kind.format, "scheme": scheme, "backends": list(runs_on),
                "weights": f"int8 symmetric per {'output channel' if kind.per_channel else 'tensor'}",
                "tool": kind.tool,
                "activations": "dynamic uint8" if not kind.calibrated else ("int8 symmetric" if kind.symmetric_activations else "uint8"),
                "layers_quantized": len(used), "layers_planned": len(layers), "gemm_rewritten": gemms,
                "layers_fp32_activation_outliers": sorted(set(mapping) - set(used)),
                "calibration": cal_info if kind.calibrated else None,
                "zeros": int8_zeros(ir, qmodel, used),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entries


def _write_int4(ir: ModelIR, kind: VariantKind, src: Path, out: Path, mapping: dict[str, tuple[str, str]],
               node_outputs: dict[str, str], scheme: str, runs_on: tuple[str, ...], planned: int, gemms: int,
               external: bool) -> dict[str, Any]:
    """Write one weight-only variant (int4 or 8-bit MatMulNBits) and its manifest entry; every planned layer
    must have become a MatMulNBits node (checked: a layer left float would make the variant's figures lie)."""
    from compiler.lowering.int4 import compress_matmulnbits, compress_nncf, int4_nodes, int4_zeros, weights_label

    bits = layer_bits(ir, mapping, kind)
    kept_float: list[str] = []
    if kind.tool == "nncf":  # NNCF writes int4 only: an 8-bit head stays float in OpenVINO's variant
        kept_float = sorted(n for n in mapping if bits[n] != kind.weight_bits)
        mapping = {n: v for n, v in mapping.items() if bits[n] == kind.weight_bits}
        compress_nncf(src, out, [node for node, _ in mapping.values()], external)
    else:
        groups = sorted({b for b in bits.values()})
        step_src = src
        for i, b in enumerate(groups):  # one quantizer pass per bit width (MatMuls already packed are left alone)
            step_out = out if i == len(groups) - 1 else out.with_name(f".{b}bit-{out.name}")
            compress_matmulnbits(step_src, step_out, [node for n, (node, _) in mapping.items() if bits[n] == b], external, bits=b)
            if step_src != src:
                step_src.unlink(missing_ok=True)
                step_src.with_name(step_src.name + ".data").unlink(missing_ok=True)
            step_src = step_out
    qmodel = load_onnx(out)
    failed = [c for c in graph_rules(qmodel) if not c["ok"]]
    if failed:
        raise LoweringError(f"variant '{kind.name}' breaks rule '{failed[0]['rule']}': {failed[0]['detail']}")
    outputs = {layer: node_outputs[node] for layer, (node, _) in mapping.items()}
    done = int4_nodes(qmodel, outputs)
    left = sorted(set(outputs) - set(done))
    if left:
        raise LoweringError(f"variant '{kind.name}': {len(left)} planned layers did not become MatMulNBits "
                            f"(first: {left[0]}); MatMulNBits needs each weight's input dim to allow its blocks")
    extra = sum(n.op_type == "MatMulNBits" for n in qmodel.graph.node) - len(done)
    if extra:
        raise LoweringError(f"variant '{kind.name}': {extra} layers outside the plan became MatMulNBits (the plan keeps them float)")
    widths = {b: sum(1 for n in done if bits[n] == b) for b in sorted(set(bits[n] for n in done))}
    return {
        "file": path_rel(out), "format": kind.format, "scheme": scheme, "backends": list(runs_on),
        "weights": weights_label(kind.weight_bits) + ("" if len(widths) < 2 else
                                                      f"; layers per bit width {widths} (an 8-bit head)"),
        "layers_by_bits": {str(b): c for b, c in widths.items()},
        **({"layers_kept_float": kept_float} if kept_float else {}),
        "tool": kind.tool, "activations": "float (weight-only)",
        "layers_quantized": len(done), "layers_planned": planned, "gemm_rewritten": gemms,
        "layers_fp32_activation_outliers": [], "calibration": None, "zeros": int4_zeros(ir, qmodel, outputs),
    }


def _quantize(kind: VariantKind, src: Path, out: Path, nodes: list[str], feeds: list[dict[str, np.ndarray]],
              external: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    common = dict(op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=kind.per_channel, reduce_range=False,
                  weight_type=QuantType.QInt8, use_external_data_format=external)
    try:
        with _quiet_root_logger():
            if not kind.calibrated:
                quantize_dynamic(str(src), str(out), extra_options={"MatMulConstBOnly": True}, **common)
                return
            quantize_static(
                str(src), str(out), _FeedReader(feeds),
                quant_format=QuantFormat.QDQ if kind.format == "QDQ" else QuantFormat.QOperator,
                activation_type=QuantType.QInt8 if kind.symmetric_activations else QuantType.QUInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True,
                               "ActivationSymmetric": kind.symmetric_activations},
                **common)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises anything
        raise LoweringError(f"onnxruntime quantization to '{kind.name}' failed: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer warns through the root logger ("consider pre-processing"): the
    report carries what matters, so its warnings are muted for the duration of the call only."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)


def int8_weight(qmodel: Any, node_name: str, weight: str) -> Any:
    """The int8 initializer holding a layer's weight in a quantized graph: onnxruntime names it
    `<weight>_quantized`; otherwise follow the layer's MatMul (same node name) back through its
    DequantizeLinear (NNCF)."""
    inits = {i.name: i for i in qmodel.graph.initializer}
    if f"{weight}_quantized" in inits:
        return inits[f"{weight}_quantized"]
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    node = next((n for n in qmodel.graph.node if n.name == node_name), None)
    if node is None or len(node.input) < 2:
        return None
    for tensor in node.input[:2]:
        dq = producers.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            return inits[dq.input[0]]
    return None


def int8_zeros(ir: ModelIR, qmodel: Any, mapping: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Exact zeros of the quantized layers: torch weights vs their int8 initializers. Symmetric
    quantization maps 0 to 0, so int8 zeros ≥ torch zeros (tiny weights may round to 0)."""
    from onnx import numpy_helper

    torch_zeros = int8 = mapped = 0
    lost = []
    for layer, (node_name, weight) in mapping.items():
        q = int8_weight(qmodel, node_name, weight)
        if q is None:
            continue
        mapped += 1
        tz = int((ir.weight(layer) == 0).sum())
        qz = int((numpy_helper.to_array(q) == 0).sum())
        torch_zeros += tz
        int8 += qz
        if qz < tz:
            lost.append(layer)
    return {"layers_mapped": mapped, "torch_zeros": torch_zeros, "int8_zeros": int8, "preserved": not lost,
            "lost": lost[:10]}


def _quantize_nncf(src: Path, out: Path, fp32_nodes: list[str], feeds: list[dict[str, np.ndarray]],
                   external: bool) -> None:
    """OpenVINO's int8 form: NNCF post-training quantization (TRANSFORMER preset: SmoothQuant, its own
    choice of quantized ops), the plan's fp32 layers in the ignored scope."""
    import nncf

    model = load_onnx(src)
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    try:
        nncf_logger.setLevel(logging.ERROR)  # restored below: NNCF logs INFO and draws progress bars
        with _quiet_root_logger(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(feeds), ignored_scope=nncf.IgnoredScope(names=fp32_nodes, validate=False))
    except Exception as exc:  # noqa: BLE001 - NNCF raises anything
        raise LoweringError(f"NNCF quantization to 'int8-openvino' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        nncf_logger.setLevel(level)
    save_onnx(quantized, out, external=external or None, data_file=out.name + ".data")
