"""int4 weight-only quantization (issue 13): `--quantize int4` on onnxruntime (MatMulNBits) and OpenVINO
(NNCF weight compression), and dense int4 timed beside dense fp32 / int8 by verify and bench --decode.

Accuracy bound: each int4 variant is compared with the artifact's own fp32 graph (same pruned weights,
so only the int4 rounding differs). Measured on this tiny Llama (50 %, 2 blocks, hidden 64) with the
feeds below: logits cosine 0.9965 on both onnxruntime (MatMulNBits) and OpenVINO (NNCF, f32). Zero points
in the wrong layout — how NNCF 3.4 writes them, which OpenVINO misreads; repaired by `pack_zero_points`
— gave 0.953, so the bound 0.98 fails that and passes the correct files with margin. (The issue's
suggested 0.9 would let that bug through.)
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.artifact import Artifact
from compiler.lowering.files import MODEL_FILE
from compiler.lowering.int4 import INT4_BLOCK, int4_nodes, pack_zero_points, unpack_int4
from compiler.lowering.quant import backends_without_form, variants_for_scheme
from compiler.lowering.rules import layer_nodes
from compiler.registry import Registry
from runtimes.measure.stats import compare_outputs

COMPILE = ("--sparsity", "0.5", "--allocation", "uniform", "--calib-samples", "2", "--calib-seqlen", "16",
           "--runs", "2", "--seqlen", "16")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense-cache-int4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEC_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def int4_artifact(cache_dir, tiny_model_dir, tmp_path_factory):
    pytest.importorskip("openvino", reason="openvino is not installed")
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'sparsec[openvino]')")
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path_factory.mktemp("int4") / "llama-int4"
    result = CliRunner().invoke(main, ["compile", str(tiny_model_dir("llama")), "-o", str(out), *COMPILE,
                                       "--quantize", "int4", "--backend", "onnxruntime,openvino"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _planned(manifest) -> set[str]:
    return {n for n, p in manifest["plan"].items() if p.get("quant") == "int4"}


def _feeds(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    ids = np.random.default_rng(0).integers(3, 400, (1, 16)).astype(np.int64)
    feeds = {}
    for i in graph.input:
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(16, dtype=np.int64)[None]
        else:  # an empty past: [batch, heads, 0, head_dim]
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = np.zeros([1, dims[1], 0, dims[3]], np.float32)
    return feeds


def _outputs(model_file, feeds, ref_file):
    outputs = {}
    for name, path in (("int4", model_file), ("fp32", ref_file)):
        outputs[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    return outputs


def test_int4_variants_per_backend():
    reg = Registry.default(kinds=("backend",))
    assert variants_for_scheme("int4", ("onnxruntime", "openvino"), reg) == {
        "int4-matmulnbits": ("onnxruntime",), "int4-openvino": ("openvino",)}
    # OpenVINO not requested: it is still written for (lowered by default), in onnxruntime's form
    assert variants_for_scheme("int4", ("onnxruntime",), reg) == {"int4-matmulnbits": ("onnxruntime", "openvino")}
    # sparsec packs int4 itself (sparse-int4 / dense-int4 in runtimes/kernels), so it has a form
    assert backends_without_form("int4", ("onnxruntime", "deepsparse", "tensorrt", "sparsec"), reg) == [
        "deepsparse", "tensorrt"]
    assert backends_without_form("int8", ("sparsec",), reg) == []  # int8 forms are not checked this way


def test_int4_on_a_backend_without_int4_is_one_line_error(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    for backend in ("deepsparse", "onnxruntime,tensorrt"):  # refused whether the backend is installed or not
        r = cli("compile", tiny_model_dir("llama"), "-o", out, *COMPILE, "--quantize", "int4", "--backend", backend)
        assert r.exit_code != 0
        lines = [line for line in r.output.strip().splitlines() if line.strip() and not line.startswith("licence (")]
        assert len(lines) == 1 and lines[0].startswith("error:") and "int4" in lines[0], r.output
        assert backend.split(",")[-1] in lines[0] and "it runs on: onnxruntime, openvino" in lines[0] and not out.exists()


def test_onnxruntime_graph_has_matmulnbits_for_every_planned_layer(int4_artifact):
    manifest = Artifact.load(int4_artifact).manifest
    variant = manifest["lowering"]["variants"]["int4-matmulnbits"]
    assert variant["backends"] == ["onnxruntime"] and manifest["lowering"]["backend_files"]["onnxruntime"] == variant["file"]
    planned = _planned(manifest)
    # the head is in the plan only when the quantize pass's head check passed (include_outside_blocks=auto)
    assert planned and variant["layers_quantized"] == len(planned)
    fp32 = onnx.load(str(int4_artifact / MODEL_FILE))
    outputs = {layer: next(n.output[0] for n in fp32.graph.node if n.name == node)
               for layer, (node, _) in layer_nodes(fp32, planned).items()}
    q = onnx.load(str(int4_artifact / variant["file"]))
    nodes = int4_nodes(q, outputs)
    assert set(nodes) == planned
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in next(iter(nodes.values())).attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == INT4_BLOCK
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == len(planned)  # lm_head stays a float MatMul
    # pruned zeros stay exact zeros (code == the block's zero point)
    assert variant["zeros"]["preserved"] and variant["zeros"]["int4_zeros"] >= variant["zeros"]["torch_zeros"] > 0
    feeds = _feeds(int4_artifact / MODEL_FILE)
    out = _outputs(int4_artifact / variant["file"], feeds, int4_artifact / MODEL_FILE)
    assert compare_outputs("text-generation", out["fp32"], out["int4"], np.ones((1, 16), bool))["cosine"] > 0.98


def test_openvino_variant_runs_compressed_u4_weights(int4_artifact):
    import openvino as ov

    from runtimes.base import RunnerOptions
    from runtimes.openvino_backend import OpenVinoBackend

    manifest = Artifact.load(int4_artifact).manifest
    variant = manifest["lowering"]["variants"]["int4-openvino"]
    assert variant["backends"] == ["openvino"] and variant["tool"] == "nncf"
    assert variant["layers_quantized"] == len(_planned(manifest)) and variant["zeros"]["preserved"]
    path = int4_artifact / variant["file"]
    consts = [op for op in ov.Core().read_model(str(path)).get_ordered_ops() if op.get_type_name() == "Constant"]
    assert sum(str(op.get_element_type()) in ("<Type: 'uint4_t'>", "<Type: 'int4_t'>") for op in consts) >= len(_planned(manifest))
    feeds = _feeds(int4_artifact / MODEL_FILE)
    backend = OpenVinoBackend()
    with backend.runner(path, RunnerOptions(threads=2, batch_size=1, seqlen=16), precision="f32") as runner:
        assert any(k.endswith(":u4") or k.endswith(":i4") for k in runner.details["fully_connected"]), runner.details
        got = runner.infer(feeds)["logits"]
    ref = ort.InferenceSession(str(int4_artifact / MODEL_FILE), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    assert compare_outputs("text-generation", ref, got, np.ones((1, 16), bool))["cosine"] > 0.98


def test_pack_zero_points_packs_two_per_byte():
    from onnx import helper, numpy_helper

    zp = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)  # N=2 rows, 3 blocks, one point per byte (NNCF's layout)
    node = helper.make_node("MatMulNBits", ["a", "b", "s", "zp"], ["y"], domain="com.microsoft", K=3 * INT4_BLOCK, N=2,
                            bits=4, block_size=INT4_BLOCK)
    codes = np.zeros((2, 3, INT4_BLOCK // 2), np.uint8)
    graph = helper.make_graph([node], "g", [], [], [numpy_helper.from_array(codes, "b"), numpy_helper.from_array(zp, "zp")])
    model = helper.make_model(graph)
    assert pack_zero_points(model) == 1
    packed = numpy_helper.to_array(model.graph.initializer[1])
    assert packed.tolist() == [[0x21, 0x03], [0x54, 0x06]]
    q, zero = unpack_int4(model, node)
    assert q.shape == zero.shape == (2, 3 * INT4_BLOCK) and zero[:, ::INT4_BLOCK].tolist() == zp.tolist()
    assert pack_zero_points(model) == 0  # already packed


def test_verify_reports_dense_int4_beside_dense_fp32(int4_artifact):
    report = Artifact.load(int4_artifact).report["backends"]
    assert report["onnxruntime"]["files"]["compiled"] == "onnx/int4-matmulnbits/model.onnx"
    assert report["openvino"]["files"]["compiled"] == "onnx/int4-openvino/model.onnx"
    for backend, label in (("onnxruntime", "dense int4-matmulnbits"), ("openvino", "dense int4-openvino")):
        r = report[backend]
        assert label in r["dense_configs_p50_ms"] and "dense fp32" in r["dense_configs_p50_ms"]
        assert label in r["decode"]["dense_configs_p50_ms"]
        assert r["dense_int8_accuracy"][label]["cosine"] > 0.98  # dense int4 vs dense fp32, same backend
    assert "dense int8-dynamic" in report["onnxruntime"]["dense_configs_p50_ms"]  # int4 beside int8, not instead


def test_int8_artifact_gets_the_dense_int4_alternative(cli, cache_dir, tiny_model_dir, tmp_path):
    """An int8 plan is timed against dense int4 too (the question: is sparsity worth it, or is int4 the better buy)."""
    out = tmp_path / "llama-int8"
    r = cli("compile", tiny_model_dir("llama"), "-o", out, *COMPILE, "--quantize", "int8-dynamic", "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    ort_report = Artifact.load(out).report["backends"]["onnxruntime"]
    assert {"dense int8-dynamic", "dense int4-matmulnbits"} <= set(ort_report["decode"]["dense_configs_p50_ms"])
    bench = tmp_path / "decode.json"
    res = cli("bench", out, "--decode", "--backend", "onnxruntime", "--threads", "2", "--seqlen", "16", "--tokens", "4",
              "--out", bench)
    assert res.exit_code == 0, res.output
    rows = {row["config"]: row for row in json.loads(bench.read_text())["decode"][0]["rows"]}
    assert {"compiled", "dense fp32", "dense int4-matmulnbits"} <= set(rows)
    # int4 reads fewer weight bytes than fp32 (the compiled int8 plan may also hold an int8 LM head, which
    # the quantize pass's head check decides, so on this tiny model it can read fewer bytes than int4 blocks)
    assert rows["dense int4-matmulnbits"]["weight_bytes_per_token"] < rows["dense fp32"]["weight_bytes_per_token"]


def test_input_dim_not_a_multiple_of_64_on_both_tools(tmp_path):
    """K = 96: NNCF adjusts the group to 32 (3 blocks, odd: zero points repacked with a pad nibble),
    onnxruntime pads the last block; both runtimes then compute x @ W within int4 rounding (relative
    error ~0.09 for Gaussian weights, measured 0.083 / 0.090)."""
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'sparsec[openvino]')")
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    from compiler.lowering.int4 import compress_matmulnbits, compress_nncf

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/model/layers.0/fc/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 128])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "fc.onnx"
    onnx.save(model, str(src))
    x = rng.standard_normal((4, 96)).astype(np.float32)
    ref = x @ w
    for compress in (compress_matmulnbits, compress_nncf):
        out = tmp_path / f"{compress.__name__}.onnx"
        compress(src, out, [node.name], False)
        assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["MatMulNBits"]
        got_ort = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        got_ov = np.asarray(ov.Core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0])
        for got in (got_ort, got_ov):
            assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.15, compress.__name__


def test_int8_weight_only_on_onnxruntime_and_sparsec(cli, cache_dir, tiny_model_dir, tmp_path):
    """`--quantize int8-weight`: onnxruntime runs 8-bit MatMulNBits on every planned layer (pruned zeros
    exact, logits near fp32 — closer than int4), our kernels run it as their int8 form, and verify times
    the dense 8-bit weight-only form beside dense fp32; backends with no form refuse it up front."""
    reg = Registry.default(kinds=("backend",))
    assert backends_without_form("int8-weight", ("onnxruntime", "sparsec", "openvino", "deepsparse"), reg) == [
        "openvino", "deepsparse"]
    out = tmp_path / "llama-w8"
    result = cli("compile", tiny_model_dir("llama"), "-o", out, *COMPILE, "--quantize", "int8-weight",
                 "--backend", "onnxruntime")
    assert result.exit_code == 0, result.output
    art = Artifact.load(out)
    variant = art.manifest["lowering"]["variants"]["int8-matmulnbits"]
    planned = {n for n, p in art.manifest["plan"].items() if p.get("quant") == "int8-weight"}
    assert planned and variant["layers_quantized"] == len(planned) and variant["weights"].startswith("int8 asymmetric")
    q = onnx.load(str(out / variant["file"]))
    bits = {onnx.helper.get_attribute_value(a) for n in q.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    assert bits == {8} and sum(n.op_type == "MatMulNBits" for n in q.graph.node) == len(planned)
    assert variant["zeros"]["preserved"] and variant["zeros"]["int4_zeros"] >= variant["zeros"]["torch_zeros"] > 0
    feeds = _feeds(out / MODEL_FILE)
    logits = _outputs(out / variant["file"], feeds, out / MODEL_FILE)
    assert compare_outputs("text-generation", logits["fp32"], logits["int4"], np.ones((1, 16), bool))["cosine"] > 0.999
    r = art.report["backends"]["onnxruntime"]
    assert r["files"]["compiled"] == variant["file"] and "dense int8-matmulnbits" in r["dense_configs_p50_ms"]
    bad = cli("compile", tiny_model_dir("llama"), "-o", tmp_path / "ov", *COMPILE, "--quantize", "int8-weight",
              "--backend", "openvino")
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1 and "openvino" in bad.output


def test_int4_plan_with_an_8bit_head(tiny_model_dir, tmp_path):
    """A head that fails the int4 check but passes at 8 bits (passes/quantization.py HEAD_FALLBACK) is planned
    `int8-weight` inside the int4 plan: onnxruntime's variant (and its fused decode graph) holds it as 8-bit
    MatMulNBits beside the 4-bit blocks, OpenVINO's (NNCF: int4 only) keeps it float and says so; logits stay
    close to fp32's."""
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'sparsec[openvino]')")
    import torch

    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.lowering.lower import lower_artifact
    from compiler.pass_infra import PassContext
    from compiler.trace import load_and_trace
    from passes.quantization import Quantize

    ir = load_and_trace(str(tiny_model_dir("llama")))
    with torch.no_grad():
        ir.get_module("lm_head").weight.mul_(30.0)
    calib = build_calibration(ir, CalibrationConfig(samples=4, seqlen=32))
    Quantize(scheme="int4")(ir, PassContext(calibration=calib))
    assert ir.plan["lm_head"].quant == "int8-weight"
    section = lower_artifact(ir, tmp_path, ("onnxruntime", "openvino"), calib)
    ort_variant, ov_variant = section["variants"]["int4-matmulnbits"], section["variants"]["int4-openvino"]
    blocks = len(ir.layers) - 1
    assert ort_variant["layers_by_bits"] == {"4": blocks, "8": 1} and ort_variant["layers_quantized"] == blocks + 1
    assert ov_variant["layers_by_bits"] == {"4": blocks} and ov_variant["layers_kept_float"] == ["lm_head"]
    for rel in (ort_variant["file"], ort_variant["decode_graph"]["file"]):
        q = onnx.load(str(tmp_path / rel))
        bits = sorted(next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "bits")
                      for n in q.graph.node if n.op_type == "MatMulNBits")
        assert bits == [4] * blocks + [8], rel
    feeds = _feeds(tmp_path / MODEL_FILE)
    out = _outputs(tmp_path / ort_variant["file"], feeds, tmp_path / MODEL_FILE)
    assert compare_outputs("text-generation", out["fp32"], out["int4"], np.ones((1, 16), bool))["cosine"] > 0.98
