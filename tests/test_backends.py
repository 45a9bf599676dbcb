"""Backends: onnxruntime (always), OpenVINO (when installed), TensorRT (unavailable here: no GPU)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import SparsecError
from compiler.lowering.feeds import graph_feeds, text_batch
from compiler.lowering.files import MODEL_FILE
from compiler.lowering.lower import lower_artifact
from compiler.registry import Registry
from compiler.trace import load_and_trace
from runtimes.base import RunnerOptions
from runtimes.measure.stats import compare_outputs
from runtimes.onnxruntime_backend import OnnxRuntimeBackend


@pytest.fixture(scope="module")
def bert_onnx(tiny_model_dir, tmp_path_factory):
    ir = load_and_trace(str(tiny_model_dir("bert")))
    root = tmp_path_factory.mktemp("backend-bert")
    section = lower_artifact(ir, root)
    ids, mask = text_batch(ir.tokenizer, ["Open the file and return a stream.", "Close it."], 2, 16)
    return root / MODEL_FILE, section, graph_feeds(section, ids, mask), mask.astype(bool)


def test_builtin_backends_are_registered_by_entry_points():
    reg = Registry.default()
    for name in ("onnxruntime", "openvino", "tensorrt"):
        assert name in reg.backends and "entry point" in reg.backends[name].origin


def test_onnxruntime_runner(bert_onnx):
    path, section, feeds, _ = bert_onnx
    ok, reason = OnnxRuntimeBackend.available()
    assert ok and "onnxruntime" in reason
    with OnnxRuntimeBackend().runner(path, RunnerOptions(threads=1, batch_size=2, seqlen=16)) as runner:
        out = runner.infer(feeds)
        assert out["last_hidden_state"].shape[:2] == (2, 16)
        assert runner.last_inference_ms > 0 and runner.details["sparse_kernels"] is False
        with pytest.raises(SparsecError, match="missing inputs"):
            runner.infer({"input_ids": feeds["input_ids"]})


def test_openvino_runs_dense_graph_close_to_onnxruntime(bert_onnx, tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'sparsec[openvino]')")
    from runtimes.openvino_backend import OpenVinoBackend

    path, _, feeds, valid = bert_onnx
    ok, reason = OpenVinoBackend.available()
    assert ok, reason
    ref = OnnxRuntimeBackend().runner(path, RunnerOptions()).infer(feeds)["last_hidden_state"]
    backend = OpenVinoBackend()
    opts = RunnerOptions(threads=2, batch_size=2, seqlen=16)
    prepared = backend.prepare(path, tmp_path / "ov", opts)
    assert prepared.suffix == ".xml"  # static-shape IR for the measured shape
    with backend.runner(prepared, opts) as static, backend.runner(path, opts) as dynamic:
        assert static.details["static_shapes"] and not dynamic.details["static_shapes"]
        assert static.details["precision"] in ("bfloat16", "f32", "float32", "f16")
        assert static.details["sparse_kernels"] is False  # fp32 weights never qualify
        for runner in (static, dynamic):
            got = runner.infer(feeds)["last_hidden_state"]
            assert compare_outputs("feature-extraction", ref, got, valid)["cosine"] > 0.999
        short = {k: v[:1, :9] for k, v in feeds.items()}  # dynamic shapes, as the server sends them
        assert dynamic.infer(short)["last_hidden_state"].shape[:2] == (1, 9)


def _int8_matmul_model(path, rows: int, cols: int, zero_fraction: float):
    rng = np.random.default_rng(0)
    w = rng.integers(1, 127, size=(rows, cols), dtype=np.int8)
    w[rng.random((rows, cols)) < zero_fraction] = 0
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
                              [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.float32(0.1), "scale")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_openvino_sparse_eligibility_follows_the_plugin_rule(tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed")
    from runtimes.openvino_backend import sparse_eligible_layers

    sparse = _int8_matmul_model(tmp_path / "a.onnx", 128, 128, 0.6)
    assert sparse_eligible_layers(sparse, 0.5) == {"int8_weights": 1, "eligible": 1}
    assert sparse_eligible_layers(sparse, 0.7)["eligible"] == 0  # not sparse enough for that rate
    odd = _int8_matmul_model(tmp_path / "b.onnx", 100, 128, 0.9)
    assert sparse_eligible_layers(odd, 0.5)["eligible"] == 0  # dims must be multiples of 64


def test_tensorrt_is_unavailable_here_with_install_command(cli):
    from runtimes.tensorrt_backend import TensorRtBackend, _profile_shapes, sparse_layers_from_log

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        ok, reason = TensorRtBackend.available()
        assert not ok and "tensorrt is not installed" in reason
        assert "pip install tensorrt" in TensorRtBackend.install_hint
    result = cli("backends")
    assert result.exit_code == 0 and "tensorrt" in result.output
    log = ["INFO: [TRT] Layers eligible for sparse math: fc1, fc2",
           "INFO: [TRT] TRT inference plan picked sparse implementation for layers: fc2"]
    assert sparse_layers_from_log(log) == {"eligible": ["fc1", "fc2"], "picked": ["fc2"]}
    opts = RunnerOptions(batch_size=4, seqlen=64)
    assert _profile_shapes((-1, -1), "input_ids", opts) == ((1, 1), (4, 64), (4, 64))
    assert _profile_shapes((-1, 2, -1, 16), "past_key_values.0.key", opts) == ((1, 2, 0, 16), (4, 2, 64, 16), (4, 2, 64, 16))
