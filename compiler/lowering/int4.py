"""Weight-only variants: the planned layers' MatMuls become `MatMulNBits` (com.microsoft), weights
4-bit (scheme `int4`) or 8-bit (scheme `int8-weight`) in blocks of `INT4_BLOCK` along the input
dimension, activations float in the graph.

| variant            | tool                                   | runs on     |
|--------------------|----------------------------------------|-------------|
| `int4-matmulnbits` | onnxruntime `MatMulNBitsQuantizer` (RTN) | onnxruntime (and OpenVINO without NNCF) |
| `int4-openvino`    | NNCF `compress_weights` (INT4_ASYM)      | openvino    |
| `int8-matmulnbits` | onnxruntime `MatMulNBitsQuantizer` (RTN, bits=8) | onnxruntime |

Why 8-bit weight-only beside the W8A8 `int8-dynamic`: on SmolLM2-135M (1,024 held-out tokens, windows of
128; benchmarks/decode_vs_genai.py) `int8-dynamic` — activations quantized to uint8 per tensor at run
time — raised perplexity from 26.35 (fp32) to 39.35 (+49 %; and unstably: 42.13 from the fused graph, whose
layers agree with the portable one to 7e-6), while 8-bit weights alone gave 26.53 (+0.7 %, openvino-genai's
weight-only int8: 26.41) and decoded nearly as fast (53.9 vs 58.8 tok/s on the fused graph, 1 thread, paired
rounds; benchmarks/results/decode_table_smollm2.json, docs/measurement.md).

Settings, one for both tools so their accuracy compares like with like (and with openvino-genai's
int4 reference, `optimum-cli --weight-format int4 --group-size 64`, benchmarks/ovgenai_reference.py):
- block (group) size 64 (NNCF: a smaller power of two where 64 does not divide the input dim; onnxruntime
  pads the last block): divides every hidden size we meet (576 = 9 x 64 for SmolLM2, where 128 does
  not), and costs 0.5 + 4/64 = 0.5625 bytes per weight with fp32 scales (+ 1/128 for zero points);
- asymmetric (a zero point per block): uses all 16 levels on skewed blocks; a pruned zero still
  dequantizes to exactly 0 (the zero point is an integer), which `int4_zeros` checks;
- onnxruntime `accuracy_level=4`: MLAS quantizes the activations to int8 per block inside the kernel
  (the graph stays float; nothing is calibrated). Measured on one 576x1536 MatMul, 2 threads, load ~8.6
  (/tmp experiment, ORT 1.31.1): M=1 p50 78 us vs 176 us at the default level (fp32 compute) and 202 us
  fp32, relative error 0.0940 vs 0.0937 — the same error, 2.3x faster for decode.
OpenVINO reads `MatMulNBits` as u4 weight constants and runs them on its compressed-weight
FullyConnected kernels (`FullyConnected:...:u4`), so NNCF's ONNX output is OpenVINO's int4 form here.
Layers outside the plan (embeddings, `lm_head` unless planned) stay fp32 in both variants.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from compiler.ir import ModelIR
from compiler.lowering.export import save_onnx
from compiler.lowering.format import LoweringError, load_onnx

INT4_BLOCK = 64
INT4_SYMMETRIC = False
ORT_ACCURACY_LEVEL = 4


def weights_label(bits: int = 4) -> str:
    return f"int{bits} {'symmetric' if INT4_SYMMETRIC else 'asymmetric'}, blocks of {INT4_BLOCK} along the input dim"


def compress_matmulnbits(src: Path, out: Path, nodes: list[str], external: bool, bits: int = 4) -> None:
    """onnxruntime's weight-only form: round-to-nearest blockwise `bits`-bit weights in MatMulNBits, planned nodes only
    (its `nodes_to_include` adds to the op types rather than restricting them: every other MatMul is
    excluded by name instead)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = load_onnx(src)
    keep = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in keep]
    ort_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = ort_logger.level
    try:
        ort_logger.setLevel(logging.ERROR)  # it logs one INFO line per node
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=INT4_BLOCK, is_symmetric=INT4_SYMMETRIC,
                                         accuracy_level=ORT_ACCURACY_LEVEL, nodes_to_exclude=exclude,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises anything
        raise LoweringError(f"onnxruntime quantization to 'int{bits}-matmulnbits' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        ort_logger.setLevel(level)
    save_onnx(quantizer.model.model, out, external=external or None, data_file=out.name + ".data")


def compress_nncf(src: Path, out: Path, nodes: list[str], external: bool) -> None:
    """OpenVINO's int4 form: NNCF weight compression (INT4_ASYM/INT4_SYM, group 64, ratio 1.0) of the
    planned nodes; every other weight-carrying node is in the ignored scope (NNCF would otherwise put
    embeddings and the last MatMul in int8)."""
    import nncf

    model = load_onnx(src)
    inits = {i.name for i in model.graph.initializer}
    keep = set(nodes)
    ignored = [n.name for n in model.graph.node
               if n.name not in keep and n.op_type in ("MatMul", "Gemm", "Gather") and any(i in inits for i in n.input)]
    mode = nncf.CompressWeightsMode.INT4_SYM if INT4_SYMMETRIC else nncf.CompressWeightsMode.INT4_ASYM
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    try:
        nncf_logger.setLevel(logging.ERROR)  # restored below: NNCF logs INFO tables and draws progress bars
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            compressed = nncf.compress_weights(model, mode=mode, group_size=INT4_BLOCK, ratio=1.0, all_layers=True,
                                               ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                                               advanced_parameters=_adjust_group_size())
    except Exception as exc:  # noqa: BLE001 - NNCF raises anything
        raise LoweringError(f"NNCF weight compression to 'int4-openvino' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        nncf_logger.setLevel(level)
    pack_zero_points(compressed)
    save_onnx(compressed, out, external=external or None, data_file=out.name + ".data")


def _adjust_group_size() -> Any:
    """A weight whose input dim 64 does not divide gets the largest power-of-two group (>= 16, the
    smallest MatMulNBits block) that does, instead of NNCF's error (K = 96 -> 32); onnxruntime's
    quantizer pads the last block instead. A dim no such group divides fails the every-layer check."""
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    return AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16)


def pack_zero_points(model: Any) -> int:
    """Repack MatMulNBits zero points written one per byte ([N, blocks] uint8, NNCF 3.4's ONNX output)
    into the layout the operator defines (two 4-bit points per byte, low nibble first, [N, ceil(blocks/2)]).
    OpenVINO reads the unpacked form as packed, i.e. wrong zero points wherever a row has more than one
    block: tiny Llama at 50 % (tests/test_int4.py's input), logits cosine vs the fp32 graph on OpenVINO
    (f32) 0.953 with NNCF's file as written, 0.9965 repacked — the same as onnxruntime's own int4 file on
    either runtime (the codes and scales of the two tools are identical).
    Returns how many initializers were repacked."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    repacked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, blocks = int(attrs["N"]), -(-int(attrs["K"]) // int(attrs["block_size"]))
        zp = numpy_helper.to_array(inits[node.input[3]])
        if attrs.get("bits", 4) != 4 or zp.dtype != np.uint8 or blocks < 2 or zp.size != n * blocks:
            continue  # already packed (or a float zero point, or one block per row: both layouts agree)
        zp = zp.reshape(n, blocks)
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        packed = (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(packed.astype(np.uint8)), node.input[3]))
        repacked += 1
    return repacked


def int4_nodes(qmodel: Any, outputs: dict[str, str]) -> dict[str, Any]:
    """Layer -> the MatMulNBits node that now produces its MatMul's output (both tools keep the tensor
    name); layers still computed by another op are left out."""
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    return {layer: producers[out] for layer, out in outputs.items()
            if out in producers and producers[out].op_type == "MatMulNBits"}


def unpack_int4(qmodel: Any, node: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(q, zero point per element) of a MatMulNBits node's weight (4- or 8-bit), shape [N, K]; None when
    its zero points are not integer codes (then exact zeros cannot be read off the codes)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in qmodel.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits = int(attrs.get("bits", 4))
    if bits not in (4, 8) or node.input[1] not in inits:
        return None
    k, n, bs = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
    q = (np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1) if bits == 4 else packed)[:, :k]
    blocks = -(-k // bs)
    if len(node.input) > 3 and node.input[3]:
        if node.input[3] not in inits:
            return None
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype != np.uint8:
            return None
        zp = zp.reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zero = np.repeat(zp[:, :blocks], bs, axis=1)[:, :k]
    else:
        zero = np.full((n, k), 1 << (bits - 1), dtype=np.uint8)
    return q, zero


def int4_zeros(ir: ModelIR, qmodel: Any, outputs: dict[str, str]) -> dict[str, Any]:
    """Exact zeros of the int4 layers: torch weights vs codes equal to their block's zero point
    (which dequantize to exactly 0); `quant.int8_zeros`'s shape with `int4_zeros` for its count."""
    torch_zeros = exact = mapped = 0
    lost = []
    for layer, node in int4_nodes(qmodel, outputs).items():
        unpacked = unpack_int4(qmodel, node)
        if unpacked is None:
            continue
        q, zero = unpacked
        mapped += 1
        tz = int((ir.weight(layer) == 0).sum())
        qz = int((q == zero).sum())
        torch_zeros += tz
        exact += qz
        if qz < tz:
            lost.append(layer)
    return {"layers_mapped": mapped, "torch_zeros": torch_zeros, "int4_zeros": exact, "preserved": not lost,
            "lost": lost[:10]}
