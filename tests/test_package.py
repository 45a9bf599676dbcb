"""`sparsec package`: a real bundle of a compiled tiny BERT, its contents, atomic/forced writes, and the
bundle's own start.sh serving the artifact from the extracted directory."""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from serve_helpers import start_bundle  # noqa: E402

ROOT = "sparsec-bundle"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_dir) -> Path:
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path_factory.mktemp("pkg") / "bert"
    res = CliRunner().invoke(main, ["compile", str(tiny_model_dir("bert")), "-o", str(out), "--backend", "onnxruntime",
                                    "--calib-samples", "4", "--calib-seqlen", "32", "--runs", "2", "--seqlen", "32"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def bundle(artifact, tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path_factory.mktemp("bundle") / "bert.tar.gz"
    res = CliRunner().invoke(main, ["package", str(artifact), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "sha256" in res.output
    return out


def test_bundle_holds_verified_artifact_pins_and_start_script(bundle, artifact):
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
        manifest = json.loads((artifact / "manifest.json").read_text())
        for rel, digest in manifest["files"].items():
            data = tar.extractfile(f"{ROOT}/artifact/{rel}").read()
            assert hashlib.sha256(data).hexdigest() == digest, rel
        assert f"{ROOT}/artifact/manifest.json" in names
        assert f"{ROOT}/sparsec/runtimes/serve/app.py" in names and f"{ROOT}/sparsec/compiler/cli.py" in names
        assert not any("__pycache__" in n for n in names)
        dist_info = f"{ROOT}/sparsec/sparsec-{metadata.version('sparsec')}.dist-info"
        entry_points = tar.extractfile(f"{dist_info}/entry_points.txt").read().decode()
        assert "onnxruntime = runtimes.onnxruntime_backend:OnnxRuntimeBackend" in entry_points
        start = tar.getmember(f"{ROOT}/start.sh")
        assert start.mode & 0o111, "start.sh must be executable"
        assert "--backend onnxruntime" in tar.extractfile(start).read().decode()
        requirements = tar.extractfile(f"{ROOT}/requirements.txt").read().decode().splitlines()
        info = json.loads(tar.extractfile(f"{ROOT}/bundle.json").read())
    pins = dict(line.split("==") for line in requirements if "==" in line)
    for dist in ("onnxruntime", "fastapi", "uvicorn", "numpy", "transformers", "prometheus-client", "torch"):
        assert pins.get(dist) == metadata.version(dist), dist
    assert "pytest" not in pins and "sparsec" not in pins  # dev extras and ourselves stay out
    assert any(line.startswith("--extra-index-url https://download.pytorch.org/whl/cpu") for line in requirements)
    assert info["backend"] == "onnxruntime" and info["artifact"]["name"] == "bert"


def test_package_never_overwrites_without_force_and_writes_atomically(bundle, artifact, cli):
    before = bundle.read_bytes()
    res = cli("package", artifact, "-o", bundle)
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output
    assert bundle.read_bytes() == before
    res = cli("package", artifact, "-o", bundle, "--force")
    assert res.exit_code == 0, res.output
    assert tarfile.is_tarfile(bundle)
    assert [p.name for p in bundle.parent.iterdir()] == [bundle.name]  # no partial files left


def test_package_refuses_tampered_artifact(artifact, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / "report.json").write_text("{}")
    out = tmp_path / "bad.tar.gz"
    res = cli("package", bad, "-o", out)
    assert res.exit_code == 1 and "sha256 mismatch for 'report.json'" in res.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]
    assert cli("package", artifact, "-o", tmp_path / "x.zip").exit_code == 1


def test_extracted_bundle_starts_and_serves(bundle, tmp_path):
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / ROOT
    # the bundle's own code (not the checkout's) is what runs, and it finds its backends
    probe = subprocess.run([sys.executable, "-c", "import compiler, importlib.metadata as m; print(compiler.__file__); "
                            "print(sorted(e.name for e in m.entry_points(group='sparsec.backends')))"],
                           env={**os.environ, "PYTHONPATH": str(root / "sparsec")}, cwd=tmp_path, capture_output=True, text=True,
                           check=True)
    assert probe.stdout.splitlines()[0].startswith(str(root / "sparsec"))
    assert "onnxruntime" in probe.stdout
    server = start_bundle(root, tmp_path)
    try:
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["hello bundle"]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "bert"
    finally:
        assert server.stop() == 0, server.log_text()
