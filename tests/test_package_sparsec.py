"""`sparsec package --backend sparsec`: a real bundle of a tiny Llama compiled for our kernels carries the slim
artifact (packed weights, the unpacked tensors, the serving signature — no ONNX graph, no dense weight of a
packed layer), the C++ sources, and a start.sh that builds the kernels and serves the same completions as the
full artifact. Slim artifacts are refused, in one line, by every command that needs the full one."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from serve_helpers import free_port, start_bundle, start_server

from compiler.artifact import Artifact
from compiler.cli import main

httpx = pytest.importorskip("httpx")

ROOT = "sparsec-bundle"
PROMPT = {"prompt": "hello world", "max_tokens": 6}


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg-sparsec") / "llama"
    res = CliRunner().invoke(main, ["compile", str(tiny_model_dir("llama")), "-o", str(out), "--sparsity", "0.7",
                                    "--method", "magnitude", "--allocation", "uniform", "--quantize", "int8",
                                    "--backend", "sparsec", "--calib-samples", "4", "--calib-seqlen", "32", "--runs", "2",
                                    "--seqlen", "32"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def extracted(artifact, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bundle-sparsec")
    out = work / "llama.tar.gz"
    res = CliRunner().invoke(main, ["package", str(artifact), "-o", str(out), "--backend", "sparsec"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [p.name for p in work.iterdir()] == [out.name]  # the slim staging directory is gone
    with tarfile.open(out) as tar:
        tar.extractall(work, filter="data")
    return work / ROOT


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_bundle_carries_the_slim_artifact_and_the_kernel_sources(artifact, extracted):
    from safetensors import safe_open

    slim = Artifact.load(extracted / "artifact", verify=True)  # its manifest verifies like any artifact's
    full = Artifact.load(artifact)
    assert slim.slim["backend"] == "sparsec"
    packed = json.loads((artifact / "sparsec" / "format.json").read_text())["layers"]
    # packed weights byte for byte; no graph but the signature stub; no dense weight of a packed layer
    assert (extracted / "artifact" / "sparsec" / "weights.safetensors").read_bytes() == \
        (artifact / "sparsec" / "weights.safetensors").read_bytes()
    assert sorted(p.name for p in (extracted / "artifact" / "onnx").rglob("*")) == ["signature.onnx"]
    with safe_open(str(extracted / "artifact" / "model" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    with safe_open(str(artifact / "model" / "model.safetensors"), framework="pt") as f:
        source_keys = set(f.keys())
    assert keys and not any(k.startswith(tuple(p + "." for p in packed)) for k in keys)
    assert keys == {k for k in source_keys if not k.startswith(tuple(p + "." for p in packed))}
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    kept = _bytes(extracted / "artifact")
    assert kept == slim.slim["kept_bytes"] + (extracted / "artifact" / "manifest.json").stat().st_size
    assert kept < _bytes(artifact) / 3, (kept, _bytes(artifact))
    assert slim.slim["source_manifest_sha256"] == json.loads((extracted / "bundle.json").read_text())[
        "artifact"]["manifest_sha256"]
    assert full.slim is None
    # the C++ sources travel, and start.sh builds them once the requirements are installed
    assert (extracted / "sparsec" / "runtimes" / "kernels" / "csrc" / "ops.cpp").is_file()
    start = (extracted / "start.sh").read_text()
    assert "-m runtimes.kernels.build" in start and "--backend sparsec" in start
    assert start.index("-m runtimes.kernels.build") < start.index("--install-only\" ]")


def test_slim_artifact_is_refused_by_commands_that_need_the_full_one(extracted, tmp_path):
    slim = extracted / "artifact"
    for args in (["verify", str(slim), "--backend", "sparsec"], ["lower", str(slim), "--backend", "onnxruntime"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code != 0
        assert "slim copy for --backend sparsec" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = subprocess.run([sys.executable, "-m", "compiler.cli", "serve", str(slim), "--backend", "onnxruntime",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "holds no graph for 'onnxruntime'" in res.stderr, res.stderr


def test_extracted_bundle_builds_and_serves_the_full_artifacts_completions(artifact, extracted, tmp_path):
    server = start_server(artifact, tmp_path, "--backend", "sparsec", "--model-name", "l")
    try:
        with server.client() as c:
            r = c.post("/v1/completions", json={"model": "l", **PROMPT})
            assert r.status_code == 200, r.text
            expected = r.json()["choices"][0]["text"]
    finally:
        assert server.stop() == 0, server.log_text()

    bundle = start_bundle(extracted, tmp_path, ready_timeout=300)
    try:
        r = httpx.post(f"{bundle.url}/v1/completions", json={"model": "llama", **PROMPT}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        assert r.json()["usage"]["completion_tokens"] == PROMPT["max_tokens"]
    finally:
        assert bundle.stop() == 0, bundle.log_text()
    assert "sparsec kernels:" in bundle.log_text()  # the build step ran (a no-op here: same sources, same venv)
