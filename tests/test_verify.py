"""Verification on the real MiniLM: compile --backend, sparsec verify / bench, gates and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.artifact import Artifact
from runtimes.measure.inputs import VerifyOptions
from runtimes.measure.stats import compare_outputs, interleaved_timing, percentiles
from runtimes.measure.verify import apply_gates

RUNS = ("--runs", "3", "--seqlen", "32")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Dense references go to a private cache (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("dense-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEC_CACHE_DIR", str(path))
        yield path


def _backends() -> str:
    try:
        import openvino  # noqa: F401
        return "onnxruntime,openvino"
    except ImportError:
        return "onnxruntime"


@pytest.fixture(scope="module")
def minilm_artifact(cache_dir, tmp_path_factory):
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path_factory.mktemp("verify") / "minilm-50"
    result = CliRunner().invoke(main, ["compile", "minilm", "-o", str(out), "--sparsity", "0.5", "--allocation", "uniform",
                                       "--method", "magnitude", "--backend", _backends(), *RUNS], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_compile_with_backends_reports_verification(minilm_artifact, cache_dir):
    art = Artifact.load(minilm_artifact)  # sha256 of every file, plots and onnx included
    report = art.report
    assert set(report["backends"]) == set(_backends().split(","))
    for name, r in report["backends"].items():
        for key in ("dense_p50_ms", "compiled_p50_ms", "speedup_vs_dense", "max_abs_diff", "cosine", "passed",
                    "batch_size", "seqlen", "threads", "speedup_vs_fastest_dense", "size"):
            assert key in r, (name, key)
        assert r["passed"] and r["seqlen"] == 32 and r["threads"] == 2
        assert 0.3 < r["cosine"] < 0.999  # 50% pruned: close to, but not equal to, the dense model
        # at least `runs` paired rounds; more until the interval is tight or the budget is spent
        assert r["latency"]["compiled"]["prefill"]["n"] >= 3 and r["timing"]["rounds"] >= 3 and r["timing"]["stopped"]
        iv = r["speedup_interval"]
        assert iv["verdict"] in ("faster", "not faster", "inconclusive") and r["verdict"] == iv["verdict"]
        assert iv["low"] <= iv["median"] <= iv["high"] and iv["median"] == r["speedup_vs_dense"]
        assert r["machine"]["cpu_model"] and r["machine"]["load_after"] is not None
        assert all(v is not None and v > 0 for v in r["cpu_ms"].values())
        # pruning zeros shrink the compressed file even where the runtime ignores them
        assert r["size"]["compiled"]["compressed_bytes"] < 0.9 * r["size"]["dense fp32"]["compressed_bytes"]
    ort = report["backends"]["onnxruntime"]
    assert ort["sparse_kernels"] is False and "dense int8-dynamic" in ort["dense_configs_p50_ms"]
    fastest = ort["fastest_dense"]
    assert fastest["p50_ms"] == min(p for r in report["backends"].values() for p in r["dense_configs_p50_ms"].values())
    if "openvino" in report["backends"]:
        assert report["backends"]["openvino"]["precision"]
    assert (minilm_artifact / "plots" / "latency.png").is_file()
    assert "onnx/model.onnx" in art.manifest["files"]
    assert any(cache_dir.rglob("model.onnx"))  # the dense reference lives outside the artifact


def test_verify_gates_exit_2_and_update_the_report(cli, minilm_artifact):
    result = cli("verify", minilm_artifact, "--backend", "onnxruntime", *RUNS, "--min-speedup", "1000")
    art = Artifact.load(minilm_artifact)  # report.json rewritten, manifest hashes refreshed
    r = art.report["backends"]["onnxruntime"]
    # a missed gate exits 2; a measurement the machine spoiled (too noisy, other processes busy) exits 4
    assert result.exit_code == (4 if r["verdict"] == "inconclusive" else 2), result.output
    assert ("gates missed" if result.exit_code == 2 else "inconclusive") in result.output and "speedup" in result.output
    assert r["timing"]["contention"]["available"] is True and r["timing"]["contention"]["own_cores"] > 0
    assert r["passed"] is False and r["gates"]["min_speedup"] == 1000
    assert "onnxruntime" in (minilm_artifact / "report.md").read_text()
    ok = cli("verify", minilm_artifact, "--backend", "onnxruntime", *RUNS, "--max-accuracy-drop", "0.9", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["onnxruntime"]["passed"] is True


def test_verify_bad_input(cli, minilm_artifact, tmp_path):
    unknown = cli("verify", minilm_artifact, "--backend", "nope")
    assert unknown.exit_code == 3 and "unknown backend 'nope'" in unknown.output
    unavailable = cli("verify", minilm_artifact, "--backend", "tensorrt")
    assert unavailable.exit_code == 3 and "install: pip install tensorrt" in unavailable.output
    threads = cli("verify", minilm_artifact, "--threads", "0")
    assert threads.exit_code == 1 and threads.output.strip().count("\n") == 0 and "threads must be > 0" in threads.output
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(minilm_artifact, tampered)
    with open(tampered / "onnx" / "model.onnx", "ab") as f:
        f.write(b"\0")
    bad = cli("verify", tampered)
    assert bad.exit_code == 1 and "sha256 mismatch for 'onnx/model.onnx'" in bad.output


def test_bench_sweep_names_the_fastest(cli, minilm_artifact):
    result = cli("bench", minilm_artifact, "--backend", "onnxruntime", "--batch-sizes", "1,2", "--threads", "1",
                 "--runs", "2", "--seqlen", "16", "--max-accuracy-drop", "0.01")
    assert result.exit_code == 0, result.output
    data = json.loads((minilm_artifact / "bench.json").read_text())
    assert {(r["batch_size"], r["threads"]) for r in data["rows"]} == {(1, 1), (2, 1)}
    assert {r["config"] for r in data["rows"]} >= {"compiled", "dense fp32", "dense int8-dynamic"}
    fastest = data["fastest"]
    assert fastest["meets_accuracy"] and "fastest meeting the accuracy gate" in result.output
    assert fastest["ms_per_sequence"] == min(r["ms_per_sequence"] for r in data["rows"] if r["meets_accuracy"])
    Artifact.load(minilm_artifact)  # bench.json is hashed into the manifest
    assert cli("bench", minilm_artifact, "--batch-sizes", "0").exit_code == 1
    assert cli("bench", minilm_artifact, "--threads", "1,x").exit_code == 1


def test_interleaved_timing_rotates_the_order():
    calls, order = {}, []
    for name in "abc":
        calls[name] = lambda n=name: order.append(n)
    times = interleaved_timing(calls, runs=3, warmup=1)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 for t in times.values())
    p = percentiles([1.0, 2.0, 3.0, 4.0])
    assert p["p50_ms"] == 2.5 and p["n"] == 4


def test_accuracy_metrics_and_gates():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 8)).astype(np.float32)
    valid = np.ones((2, 5), bool)
    same = compare_outputs("text-generation", ref, ref, valid)
    assert same["cosine"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0 and same["max_abs_diff"] == 0
    noisy = compare_outputs("feature-extraction", ref, ref + rng.standard_normal(ref.shape).astype(np.float32), valid)
    assert 0 < noisy["cosine"] < 1 and noisy["max_abs_diff"] > 0
    from compiler.errors import MeasurementInconclusive, VerificationFailed, raise_for_gates
    from runtimes.measure.speedup import speedup

    tight = speedup([10.0, 10.1, 9.9, 10.0, 10.2, 9.8], [5.0, 5.05, 4.95, 5.0, 5.1, 4.9]).to_dict()
    results = {"ort": {"compiled_p50_ms": 5.0, "speedup_vs_dense": 2.0, "cosine": 0.95, "speedup_interval": tight,
                       "dense_configs_p50_ms": {"dense fp32": 10.0, "dense int8": 4.0}}}
    apply_gates(results, VerifyOptions(min_speedup=1.5, max_accuracy_drop=0.01))
    r = results["ort"]
    assert r["speedup_vs_fastest_dense"] == pytest.approx(0.8) and r["fastest_dense"]["config"] == "dense int8"
    assert r["passed"] is False and len(r["gates"]["failures"]) == 1 and "accuracy drop" in r["gates"]["failures"][0]
    with pytest.raises(VerificationFailed):
        raise_for_gates(results, "test")
    # a noisy measurement never passes a speed gate, and alone it exits 4 (inconclusive), not 2
    noisy = speedup([10, 30, 9, 50, 10, 12], [5, 5, 40, 5, 9, 30]).to_dict()
    results = {"ort": {**results["ort"], "cosine": 1.0, "speedup_interval": noisy}}
    apply_gates(results, VerifyOptions(min_speedup=1.0))
    assert results["ort"]["passed"] is False and results["ort"]["inconclusive"] is True
    with pytest.raises(MeasurementInconclusive) as err:
        raise_for_gates(results, "test")
    assert err.value.exit_code == 4


def test_verify_causal_lm_times_prefill_and_decode(cli, cache_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "llama-int8"
    result = cli("compile", tiny_model_dir("llama"), "-o", out, "--sparsity", "0.5", "--allocation", "uniform",
                 "--calib-samples", "2", "--calib-seqlen", "16", "--quantize", "int8-dynamic",
                 "--backend", "onnxruntime", "--runs", "2", "--seqlen", "16")
    assert result.exit_code == 0, result.output
    r = Artifact.load(out).report["backends"]["onnxruntime"]
    assert r["files"]["compiled"] == "onnx/int8-dynamic/model.onnx"
    assert 0 <= r["accuracy"]["top1_agreement"] <= 1 and r["cosine"] > 0.5
    assert r["decode"]["compiled_p50_ms"] > 0 and "dense int8-dynamic" in r["decode"]["dense_configs_p50_ms"]
    assert "speedup_vs_dense_same_precision" in r and r["dense_int8_accuracy"]["dense int8-dynamic"]["cosine"] > 0.9
