"""DeepSparse backend: prepare() rules (no venv needed), venv detection and the install command's
input checks, and — when the DeepSparse venv exists (`sparsec backends install deepsparse`) — a real
MiniLM through the worker compared with onnxruntime, sparse-kernel reporting, the crash path (a
native abort, SIGKILL mid-request) and the timeout path, each leaving no zombie behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from compiler.errors import BackendUnavailable, SparsecError
from runtimes.base import RunnerOptions
from runtimes.deepsparse_backend import DeepSparseBackend, DeepSparseError, DeepSparseWorkerError

OPTS = RunnerOptions(threads=2, batch_size=1, seqlen=32)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=8, extra_opsets=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset), *(h.make_opsetid(d, 1) for d in extra_opsets)])
    model.ir_version = ir
    return model


def _save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _embedding_model(vocab: int = 10, hidden: int = 8, seq=4):
    """ids [1, seq] -> Gather(embedding) -> MatMul -> y: small enough to compile in about a second."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.random((vocab, hidden), dtype=np.float32), "emb"),
             nh.from_array(rng.random((hidden, hidden), dtype=np.float32), "w")]
    nodes = [h.make_node("Gather", ["emb", "ids"], ["e"], name="gather"), h.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    return _model(nodes, [h.make_tensor_value_info("ids", T.INT64, [1, seq])],
                  [h.make_tensor_value_info("y", T.FLOAT, [1, seq, hidden])], inits)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


# ------------------------------------------------------------------ prepare() rules (onnx only)


def test_prepare_makes_shapes_static_and_keeps_numerics(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8), dtype=np.float32)
    model = _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [h.make_tensor_value_info("x", T.FLOAT, ["batch", "sequence", 8])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["batch", "sequence", 8])], [nh.from_array(w, "w")])
    src = _save(model, tmp_path / "dyn.onnx")
    out = DeepSparseBackend().prepare(src, tmp_path / "ds", RunnerOptions(batch_size=2, seqlen=16))
    prepared = onnx.load(str(out))
    assert _dims(prepared.graph.input[0]) == [2, 16, 8]
    assert _dims(prepared.graph.output[0]) == [2, 16, 8]  # re-inferred, no symbolic dim left
    assert prepared.ir_version <= 9
    x = rng.standard_normal((2, 16, 8), dtype=np.float32)
    ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ref, got)
    notes = (tmp_path / "ds" / "deepsparse.json").read_text()
    assert "'batch' -> 2" in notes and "'sequence' -> 16" in notes


def test_prepare_converts_ir10_opset18_down(tmp_path):
    """ReduceMean changed form in opset 18 (axes became an input): converted to opset 17, IR 9."""
    import onnxruntime as ort

    axes = nh.from_array(np.array([-1], dtype=np.int64), "axes")
    model = _model([h.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=1)],
                   [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 6])],
                   [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 1])], [axes], opset=18, ir=10)
    src = _save(model, tmp_path / "new.onnx")
    out = DeepSparseBackend().prepare(src, tmp_path / "ds", OPTS)
    prepared = onnx.load(str(out))
    assert prepared.ir_version == 9
    assert [(o.domain, o.version) for o in prepared.opset_import] == [("", 17)]
    x = np.random.default_rng(1).standard_normal((1, 4, 6), dtype=np.float32)
    np.testing.assert_allclose(ort.InferenceSession(str(out)).run(None, {"x": x})[0], x.mean(-1, keepdims=True), rtol=1e-6)


def test_prepare_refuses_foreign_domain_naming_the_node(tmp_path):
    model = _model([h.make_node("FusedMatMul", ["a", "b"], ["y"], name="attn_fused", domain="com.microsoft")],
                   [h.make_tensor_value_info("a", T.FLOAT, [2, 2]), h.make_tensor_value_info("b", T.FLOAT, [2, 2])],
                   [h.make_tensor_value_info("y", T.FLOAT, [2, 2])], extra_opsets=("com.microsoft",))
    src = _save(model, tmp_path / "ms.onnx")
    with pytest.raises(DeepSparseError, match=r"'attn_fused' \(com.microsoft::FusedMatMul\)"):
        DeepSparseBackend().prepare(src, tmp_path / "ds", OPTS)
    assert not (tmp_path / "ds" / "model.onnx").exists()


def test_prepare_drops_unused_domains_and_refuses_extra_symbolic_axes(tmp_path):
    relu = [h.make_node("Relu", ["x"], ["y"], name="relu")]
    model = _model(relu, [h.make_tensor_value_info("x", T.FLOAT, [1, 4])], [h.make_tensor_value_info("y", T.FLOAT, [1, 4])],
                   extra_opsets=("com.microsoft", "ai.onnx.ml"))
    out = DeepSparseBackend().prepare(_save(model, tmp_path / "a.onnx"), tmp_path / "a", OPTS)
    assert [o.domain for o in onnx.load(str(out)).opset_import] == [""]
    kv = _model(relu, [h.make_tensor_value_info("x", T.FLOAT, ["batch", "heads_fixed_not", "past_sequence"])],
                [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4, "past_sequence"])])
    with pytest.raises(DeepSparseError, match=r"input 'x' has a symbolic axis 2 \('past_sequence'\)"):
        DeepSparseBackend().prepare(_save(kv, tmp_path / "kv.onnx"), tmp_path / "kv", OPTS)


def test_prepare_notes_int8_forms_deepsparse_runs_slowly(tmp_path):
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    inits = [nh.from_array(np.array(0.1, dtype=np.float32), "s"), nh.from_array(np.array(0, dtype=np.int8), "z")]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 4])], [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits)
    DeepSparseBackend().prepare(_save(model, tmp_path / "qdq.onnx"), tmp_path / "qdq", OPTS)
    assert "QDQ int8 graph (2 Q/DQ nodes)" in (tmp_path / "qdq" / "deepsparse.json").read_text()
    names = ["a", "a_s", "a_z", "w", "w_s", "w_z", "y_s", "y_z"]
    inits = [nh.from_array(np.ones((4, 3), dtype=np.int8), "w"), nh.from_array(np.full(3, 0.1, dtype=np.float32), "w_s"),
             nh.from_array(np.zeros(3, dtype=np.int8), "w_z")]
    inits += [nh.from_array(np.array(v, dtype=t), n) for n, v, t in
              [("a_s", 0.1, np.float32), ("a_z", 0, np.uint8), ("y_s", 0.1, np.float32), ("y_z", 0, np.uint8)]]
    model = _model([h.make_node("QLinearMatMul", names, ["y"], name="qmm")], [h.make_tensor_value_info("a", T.UINT8, [1, 4])],
                   [h.make_tensor_value_info("y", T.UINT8, [1, 3])], inits)
    DeepSparseBackend().prepare(_save(model, tmp_path / "pc.onnx"), tmp_path / "pc", OPTS)
    assert "1 QLinearMatMul nodes (e.g. 'qmm') have per-channel weight scales" in (tmp_path / "pc" / "deepsparse.json").read_text()


# ------------------------------------------------------------------ venv detection and the install command


def test_missing_venv_is_reported_with_install_command(tmp_path, monkeypatch, cli):
    from compiler.registry import Registry
    from runtimes.registry_helpers import check_backends_available

    monkeypatch.setenv("SPARSEC_DEEPSPARSE_VENV", str(tmp_path / "nowhere"))
    ok, reason = DeepSparseBackend.available()
    assert not ok and str(tmp_path / "nowhere") in reason
    with pytest.raises(BackendUnavailable, match="sparsec backends install deepsparse") as exc:
        check_backends_available(Registry.default(), ["deepsparse"])
    assert exc.value.exit_code == 3
    (tmp_path / "half" / "bin").mkdir(parents=True)
    (tmp_path / "half" / "bin" / "python").symlink_to("/bin/true")
    monkeypatch.setenv("SPARSEC_DEEPSPARSE_VENV", str(tmp_path / "half"))
    ok, reason = DeepSparseBackend.available()
    assert not ok and "install did not finish" in reason
    result = cli("backends")
    assert result.exit_code == 0 and "deepsparse" in result.output and "install" in result.output
    result = cli("compile", "minilm", "-o", tmp_path / "art", "--backend", "deepsparse")
    assert result.exit_code == 3  # unavailable; the evaluation-only licence is still said first
    assert "evaluation use only" in result.output and "sparsec backends install deepsparse" in result.output


def test_install_command_checks_its_inputs(tmp_path):
    from click.testing import CliRunner

    from compiler.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["backends", "install", "tensorrt"])
    assert result.exit_code == 1 and "no private venv" in result.output
    result = runner.invoke(main, ["backends", "install", "deepsparse", "--python", "/bin/false", "--venv", str(tmp_path / "v")])
    assert result.exit_code == 1 and "--python /bin/false does not run; deepsparse needs Python 3.11" in result.output
    assert not (tmp_path / "v").exists()


def test_install_venv_writes_marker_last_and_cleans_up_failures(tmp_path):
    """The real install steps with this interpreter, offline (--no-index): a venv whose marker makes
    it usable, a refusal to overwrite it, and a failed install that leaves nothing behind."""
    import sys

    from runtimes.venvs import MARKER, VenvError, VenvSpec, find_python, install_venv, venv_status

    version = "%d.%d" % sys.version_info[:2]
    spec = VenvSpec(name="probe", python=version, requirements=("pip",), check_module="json", env_var="UNUSED")
    python = find_python(spec, sys.executable)
    steps = []
    root = install_venv(spec, python, tmp_path / "ok", log=steps.append, pip_args=("--no-index",))
    assert (root / MARKER).is_file() and steps[-1] == "checking `import json`"
    ok, reason = venv_status(spec, root)
    assert ok and reason.startswith("json ")
    with pytest.raises(VenvError, match="already installed"):
        install_venv(spec, python, root, pip_args=("--no-index",))
    bad = VenvSpec(name="bad", python=version, requirements=("sparsec-no-such-package",), check_module="json", env_var="UNUSED")
    with pytest.raises(VenvError, match=r"installing sparsec-no-such-package failed \(exit 1\).*full log"):
        install_venv(bad, python, tmp_path / "bad", pip_args=("--no-index",))
    assert not (tmp_path / "bad").exists() and (tmp_path / "bad-install.log").is_file()


def test_timeout_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("SPARSEC_DEEPSPARSE_TIMEOUT", "soon")
    with pytest.raises(SparsecError, match="SPARSEC_DEEPSPARSE_TIMEOUT must be a number"):
        DeepSparseBackend()
    monkeypatch.setenv("SPARSEC_DEEPSPARSE_TIMEOUT", "2.5")
    assert DeepSparseBackend().infer_timeout_s == 2.5


# ------------------------------------------------------------------ the real engine (needs the venv)


@pytest.fixture(scope="module")
def deepsparse():
    ok, reason = DeepSparseBackend.available()
    if not ok:
        pytest.skip(f"DeepSparse venv absent ({reason}); create it with `sparsec backends install deepsparse`")
    return DeepSparseBackend()


def _gone(pid: int) -> bool:
    """True when the process no longer exists at all (killed AND reaped: no zombie left)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def pruned_minilm_onnx(tmp_path_factory):
    """MiniLM with every block Linear magnitude-pruned to 80%, lowered by sparsec's own lowering
    (fp32, dynamic batch/sequence, opset 17, IR 8) — the file `sparsec compile` writes."""
    import torch

    from compiler.lowering.lower import lower_model
    from compiler.trace import load_and_trace

    ir = load_and_trace("minilm")
    with torch.no_grad():
        for name in ir.layers:
            w = ir.weight(name)
            ir.set_weight(name, torch.where(w.abs() <= w.abs().flatten().kthvalue(int(0.8 * w.numel())).values, 0.0, w))
    path = tmp_path_factory.mktemp("minilm") / "model.onnx"
    lower_model(ir, path)
    return path


def test_minilm_matches_onnxruntime_and_reports_sparse_kernels(deepsparse, pruned_minilm_onnx, tmp_path):
    import onnxruntime as ort

    opts = RunnerOptions(threads=2, batch_size=2, seqlen=32)
    prepared = deepsparse.prepare(pruned_minilm_onnx, tmp_path / "ds", opts)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(2, 32), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 20:] = 0  # a padded row
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    ref = ort.InferenceSession(str(pruned_minilm_onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with deepsparse.runner(prepared, opts) as runner:
        assert runner.input_names == ("input_ids", "attention_mask", "token_type_ids")
        assert runner.info["input_shapes"] == [[2, 32]] * 3 and runner.info["version"] == "1.8.0"
        assert 0 < runner.info["fraction_of_supported_ops"] <= 1
        out = runner.infer(feeds)["last_hidden_state"]
        assert out.shape == ref.shape == (2, 32, 384)
        assert float(np.abs(out - ref).max()) < 1e-3
        assert runner.last_inference_ms >= runner.last_engine_ms > 0
        np.testing.assert_array_equal(runner.infer(feeds)["last_hidden_state"], out)  # deterministic, reusable
        with pytest.raises(DeepSparseError, match=r"compiled for \(2, 32\)"):
            runner.infer({k: v[:1] for k, v in feeds.items()})
        kernels = runner.sparse_kernels()
        assert kernels["used"] and kernels["sparse_layers"] >= 6  # at least every FFN intermediate layer
        assert all(0.7 < s < 0.9 for s in kernels["by_layer"].values())
        details = runner.details  # what verification records
        assert details["sparse_kernels"] and details["precision"] == "fp32"
        assert 0.79 < details["weight_sparsity"] < 0.81
        assert "input_ids[1] 'sequence_length' -> 32" in details["prepare_notes"]
        pid = runner.pid
    assert _gone(pid)  # close() ended and reaped the worker


def test_engine_rejection_is_reported_and_prepare_fixes_it(deepsparse, tmp_path):
    """An unprepared IR-10 file: the engine's own message comes back; prepare() makes it loadable."""
    model = _embedding_model()
    model.ir_version = 10
    src = _save(model, tmp_path / "ir10.onnx")
    with pytest.raises(DeepSparseError, match="failed to load: .*IR version: 10, max supported IR version: 9") as exc:
        deepsparse.runner(src, OPTS)
    assert not isinstance(exc.value, DeepSparseWorkerError)  # the engine refused; nothing crashed
    with deepsparse.runner(deepsparse.prepare(src, tmp_path / "ds", OPTS), OPTS) as runner:
        assert runner.infer({"ids": np.zeros((1, 4), dtype=np.int64)})["y"].shape == (1, 4, 8)


def test_concurrent_callers_share_one_worker(deepsparse, tmp_path):
    """A server calls infer() from several threads: exchanges must not interleave on the pipe."""
    from concurrent.futures import ThreadPoolExecutor

    model = _embedding_model(vocab=10)
    emb, w = (nh.to_array(i) for i in model.graph.initializer)
    path = _save(model, tmp_path / "emb.onnx")
    batches = [np.array([[i % 10, (i + 3) % 10, (i + 5) % 10, (i + 7) % 10]], dtype=np.int64) for i in range(40)]
    with deepsparse.runner(path, OPTS) as runner, ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda ids: runner.infer({"ids": ids})["y"], batches))
    for ids, out in zip(batches, outs):
        np.testing.assert_allclose(out, emb[ids] @ w, rtol=1e-5)


def test_native_abort_is_a_clear_error_not_a_dead_cli(deepsparse, tmp_path):
    """An out-of-vocabulary token id makes the engine abort() the process (SIGABRT)."""
    model = _save(_embedding_model(vocab=10), tmp_path / "emb.onnx")
    runner = deepsparse.runner(model, OPTS)
    pid = runner.pid
    assert runner.infer({"ids": np.array([[1, 2, 3, 4]], dtype=np.int64)})["y"].shape == (1, 4, 8)
    assert runner.details["weight_sparsity"] == 0 and runner.details["sparse_kernels"] is False  # no analysis run
    with pytest.raises(DeepSparseWorkerError, match=r"died during 'run' \(killed by SIGABRT\): stderr: .*exception"):
        runner.infer({"ids": np.array([[1, 2, 3, 400_000_000]], dtype=np.int64)})
    assert _gone(pid)
    with pytest.raises(DeepSparseWorkerError, match="died"):  # later calls fail fast, same message
        runner.infer({"ids": np.array([[1, 2, 3, 4]], dtype=np.int64)})
    runner.close()


def test_sigkill_mid_request_and_hung_worker(deepsparse, tmp_path):
    model = _save(_embedding_model(), tmp_path / "emb.onnx")
    feeds = {"ids": np.array([[1, 2, 3, 4]], dtype=np.int64)}
    # SIGKILL while a request is pending: the worker is stopped, the request sent, then it is killed.
    with deepsparse.runner(model, OPTS) as runner:
        pid = runner.pid
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(DeepSparseWorkerError, match="died during 'run' .killed by SIGKILL."):
            runner.infer(feeds)
        assert _gone(pid)
    # A hung worker: the request times out, the worker is killed and reaped, the error says how to wait longer.
    with DeepSparseBackend(infer_timeout_s=1.0).runner(model, OPTS) as runner:
        pid = runner.pid
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(DeepSparseWorkerError, match=r"did not answer 'run' within 1 s; killed it .*SPARSEC_DEEPSPARSE_TIMEOUT"):
            runner.infer(feeds)
        assert time.monotonic() - start < 10
        assert _gone(pid)
