"""The quantize decision pass and the int8 variants it becomes at lowering (run by real runtimes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lowering_helpers import prune_half

from compiler.calibration import CalibrationConfig, build_calibration
from compiler.lowering.feeds import graph_feeds, text_batch
from compiler.lowering.files import MODEL_FILE
from compiler.lowering.lower import lower_artifact
from compiler.lowering.quant import gemm_to_matmul, variants_for_scheme
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline
from compiler.registry import Registry
from compiler.stats import activation_ratios
from compiler.trace import load_and_trace
from passes.quantization import Quantize
from runtimes.measure.stats import compare_outputs


def _ctx(ir, samples=4, seqlen=32):
    calib = build_calibration(ir, CalibrationConfig(samples=samples, seqlen=seqlen))
    return PassContext(calibration=calib), calib


def test_quantize_is_a_decision_on_block_layers(tiny_model_dir):
    ir = load_and_trace(str(tiny_model_dir("llama")))
    before = {n: ir.weight(n).clone() for n in ir.layers}
    result = Quantize(scheme="int8-dynamic", exclude=("mlp\\.down_proj",))(ir, PassContext())
    assert result.modified is False
    planned = {n for n, p in ir.plan.items() if p.quant == "int8-dynamic"}
    expected = {n for n, layer in ir.layers.items() if layer.block is not None and "mlp.down_proj" not in n}
    assert planned == expected and "lm_head" not in planned
    assert all(torch.equal(before[n], ir.weight(n)) for n in ir.layers)
    assert result.metrics["layers_quantized"] == len(expected)


def test_quantize_spec_round_trip():
    reg = Registry.default()
    pipe = Pipeline.from_spec("quantize{scheme=int8-dynamic,exclude=lm_head;pooler,max_activation_ratio=30.0}", reg)
    assert Pipeline.from_spec(pipe.spec(), reg).spec() == pipe.spec()
    with pytest.raises(Exception, match="scheme"):
        Pipeline.from_spec("quantize{scheme=int3}", reg)


def test_static_int8_keeps_activation_outlier_layers_fp32(minilm_dir):
    """MiniLM's FFN down-projections see inputs with max|x|/rms ≈ 50-90: static int8 leaves them fp32."""
    ir = load_and_trace(str(minilm_dir))
    ctx, calib = _ctx(ir)
    ratios = activation_ratios(ir, list(ir.layers), calib.samples)
    result = Quantize(scheme="int8", max_activation_ratio=45.0)(ir, ctx)
    outliers = {n for n, r in ratios.items() if r > 45.0 and ir.layers[n].block is not None}
    assert outliers and all(n.endswith("output.dense") and "attention" not in n for n in outliers)
    assert all(ir.plan[n].quant is None for n in outliers)
    assert result.metrics["layers_activation_outliers"] == len(outliers)
    assert any(str(len(outliers)) in d and "max|x|/rms" in d for d in result.diagnostics)


@pytest.fixture(scope="module")
def quantized_bert(tiny_model_dir, tmp_path_factory):
    """Tiny BERT, 50% pruned, planned static int8, lowered with its variants."""
    ir = load_and_trace(str(tiny_model_dir("bert")))
    prune_half(ir)
    ctx, calib = _ctx(ir)
    Quantize(scheme="int8", max_activation_ratio=0)(ir, ctx)
    root = tmp_path_factory.mktemp("qbert")
    return ir, root, lower_artifact(ir, root, ("onnxruntime",), calib)


def _feeds(ir, section):
    ids, mask = text_batch(ir.tokenizer, ["Return the value of the attribute.", "Split the string at separators."], 2, 24)
    return graph_feeds(section, ids, mask), mask.astype(bool)


def test_int8_variants_run_and_stay_close(quantized_bert):
    ir, root, section = quantized_bert
    assert set(section["variants"]) == {"int8-qdq", "int8-qoperator"}
    assert section["backend_files"]["onnxruntime"] == "onnx/int8-qdq/model.onnx"
    assert section["backend_files"]["deepsparse"] == "onnx/int8-qoperator/model.onnx"
    feeds, valid = _feeds(ir, section)
    ref = ort.InferenceSession(str(root / MODEL_FILE)).run(None, feeds)[0]
    for name, variant in section["variants"].items():
        assert variant["layers_quantized"] == variant["layers_planned"] > 0
        assert variant["zeros"]["preserved"] and variant["zeros"]["int8_zeros"] >= variant["zeros"]["torch_zeros"] > 0
        got = ort.InferenceSession(str(root / variant["file"])).run(None, feeds)[0]
        acc = compare_outputs("feature-extraction", ref, got, valid)
        assert acc["cosine"] > 0.99, (name, acc)


def test_qoperator_variant_is_qlinearmatmul_in_the_default_domain(quantized_bert):
    _, root, section = quantized_bert
    model = onnx.load(str(root / section["variants"]["int8-qoperator"]["file"]))
    ops = {n.op_type for n in model.graph.node}
    assert "QLinearMatMul" in ops and "MatMul" in ops  # attention products stay fp32
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"} and model.ir_version <= 9
    qdq = onnx.load(str(root / section["variants"]["int8-qdq"]["file"]))
    assert "DequantizeLinear" in {n.op_type for n in qdq.graph.node}


def test_dynamic_variant_for_gpt2_rewrites_gemm(tiny_model_dir, tmp_path):
    """GPT-2's Conv1D exports as Gemm, which ORT's dynamic quantizer skips: it becomes MatMul + Add."""
    ir = load_and_trace(str(tiny_model_dir("gpt2")))
    Quantize(scheme="int8-dynamic")(ir, PassContext())
    section = lower_artifact(ir, tmp_path, ("onnxruntime",))
    variant = section["variants"]["int8-dynamic"]
    assert variant["gemm_rewritten"] > 0 and variant["layers_quantized"] == variant["layers_planned"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / variant["file"])).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    fp32 = onnx.load(str(tmp_path / MODEL_FILE))
    rewritten = onnx.load(str(tmp_path / MODEL_FILE))
    gemm_to_matmul(rewritten)
    assert "Gemm" not in {n.op_type for n in rewritten.graph.node}
    ids = np.array([[5, 9, 13, 4]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None].astype(np.int64)}
    feeds.update({n: np.zeros((1, section["kv"]["kv_heads"], 0, section["kv"]["head_dim"]), np.float32)
                  for n in section["inputs"][3:]})
    a = ort.InferenceSession(fp32.SerializeToString()).run(None, feeds)[0]
    b = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)
    got = ort.InferenceSession(str(tmp_path / variant["file"])).run(None, feeds)[0]
    assert compare_outputs("text-generation", a, got, np.ones((1, 4), bool))["cosine"] > 0.99


def test_variants_per_backend():
    assert variants_for_scheme("int8") == {"int8-qdq": ("onnxruntime", "openvino"), "int8-qoperator": ("deepsparse",)}
    dyn = variants_for_scheme("int8-dynamic", ("tensorrt",))
    assert dyn["int8-dynamic"] == ("onnxruntime",) and dyn["int8-qdq-sym"] == ("tensorrt",)


def test_openvino_runs_its_int8_variant(tiny_model_dir, tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed")
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'sparsec[openvino]')")
    from runtimes.base import RunnerOptions
    from runtimes.openvino_backend import OpenVinoBackend

    ir = load_and_trace(str(tiny_model_dir("bert")))
    ctx, calib = _ctx(ir)
    Quantize(scheme="int8", max_activation_ratio=0)(ir, ctx)
    section = lower_artifact(ir, tmp_path, ("openvino",), calib)
    assert section["backend_files"]["openvino"] == "onnx/int8-openvino/model.onnx"
    feeds, valid = _feeds(ir, section)
    ref = ort.InferenceSession(str(tmp_path / MODEL_FILE)).run(None, feeds)[0]
    backend = OpenVinoBackend()
    opts = RunnerOptions(threads=2, batch_size=2, seqlen=24)
    path = backend.prepare(tmp_path / section["backend_files"]["openvino"], tmp_path / "ov", opts)
    with backend.runner(path, opts) as runner:
        got = runner.infer(feeds)["last_hidden_state"]
        assert any(":i8" in k or ":u8" in k for k in runner.details["fully_connected"]), runner.details
    assert compare_outputs("feature-extraction", ref, got, valid)["cosine"] > 0.98


def _int4_with_scaled_head(tiny_model_dir, scale: float):
    """The int4 quantize pass's result on the tiny Llama whose LM head is multiplied by `scale`."""
    ir = load_and_trace(str(tiny_model_dir("llama")))
    with torch.no_grad():
        ir.get_module("lm_head").weight.mul_(scale)
    ctx, _ = _ctx(ir)
    return Quantize(scheme="int4")(ir, ctx)


def test_auto_quantizes_a_causal_lm_head_only_when_it_costs_under_1pct_perplexity(tiny_model_dir):
    """`include_outside_blocks=auto` (the default): the head check runs on the calibration text; an int8
    head passes, an int4 head with confident logits (a 30x scaled head) moves the distribution too much
    and stays fp32 — as on the real SmolLM2 (int8-dynamic +0.67 % perplexity, int4 +15 %)."""
    ir = load_and_trace(str(tiny_model_dir("llama")))
    ctx, _ = _ctx(ir)
    result = Quantize(scheme="int8-dynamic")(ir, ctx)
    check = result.metrics["head_check"]["lm_head"]
    assert check["passed"] and check["ppl_increase"] <= 0.01 and check["mean_kl"] <= 0.01 and check["tokens"] > 50
    assert ir.plan["lm_head"].quant == "int8-dynamic"
    assert any(d.startswith("lm_head quantized (int8-dynamic): perplexity") for d in result.diagnostics)

    # int4: a head with confident logits (30x scaled) fails at 4 bits, passes at 8 (HEAD_FALLBACK); 300x fails both
    int4_30 = _int4_with_scaled_head(tiny_model_dir, 30.0)
    check = int4_30.metrics["head_check"]["lm_head"]
    assert not check["passed"] and check["mean_kl"] > 0.01
    assert int4_30.metrics["head_check_fallback"]["lm_head"]["passed"]
    assert int4_30.ir.plan["lm_head"].quant == "int8-weight"
    assert all(int4_30.ir.plan[n].quant == "int4" for n in int4_30.ir.layers if n != "lm_head")
    assert any(d.startswith("lm_head fails at this scheme, checked at 8 bits next (int4)") for d in int4_30.diagnostics)
    assert any(d.startswith("lm_head quantized (int8-weight)") for d in int4_30.diagnostics)
    int4_300 = _int4_with_scaled_head(tiny_model_dir, 300.0)
    assert int4_300.ir.plan["lm_head"].quant is None
    assert not int4_300.metrics["head_check_fallback"]["lm_head"]["passed"]
    assert any(d.startswith("lm_head stays fp32 (int4)") for d in int4_300.diagnostics)
    assert any(d.startswith("lm_head stays fp32 (int8-weight)") for d in int4_300.diagnostics)
    # forced: true quantizes it without a check, false never
    ir2 = load_and_trace(str(tiny_model_dir("llama")))
    Quantize(scheme="int8-dynamic", include_outside_blocks=True)(ir2, PassContext())
    assert ir2.plan["lm_head"].quant == "int8-dynamic"


def test_auto_leaves_encoder_heads_fp32(tiny_model_dir):
    ir = load_and_trace(str(tiny_model_dir("bert")))
    ctx, _ = _ctx(ir)
    result = Quantize(scheme="int8-dynamic")(ir, ctx)
    assert "head_check" not in result.metrics
    assert all(p.quant is None for n, p in ir.plan.items() if ir.layers[n].block is None)
