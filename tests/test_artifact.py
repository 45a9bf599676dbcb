"""Artifact: atomic writes, --force, sha256 verification, manifest/report round-trip."""

import json

import pytest

from compiler.artifact import Artifact, ArtifactWriter
from compiler.errors import ArtifactError


def _write(out, force=False, payload="x"):
    with ArtifactWriter(out, force) as w:
        (w.root / "model").mkdir()
        (w.root / "model" / "weights.bin").write_text(payload)
        return w.commit({"source": {"model": "m"}, "pipeline": "p", "plan": {}})


def test_commit_writes_manifest_with_hashes(tmp_path):
    out = _write(tmp_path / "art")
    art = Artifact.load(out)
    assert art.manifest["schema_version"] == 1
    assert set(art.manifest["files"]) == {"model/weights.bin"}
    assert not list(tmp_path.glob(".art.partial-*"))


def test_refuses_to_overwrite_without_force(tmp_path):
    out = _write(tmp_path / "art", payload="first")
    with pytest.raises(ArtifactError, match="already exists: pass --force"):
        _write(out, payload="second")
    assert (out / "model" / "weights.bin").read_text() == "first"
    _write(out, force=True, payload="third")
    assert (out / "model" / "weights.bin").read_text() == "third"
    assert not list(tmp_path.glob(".art.*"))


def test_failure_inside_writer_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        with ArtifactWriter(out) as w:
            (w.root / "half.bin").write_text("partial")
            raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_tampered_and_missing_files_are_named(tmp_path):
    out = _write(tmp_path / "art")
    (out / "model" / "weights.bin").write_text("evil")
    with pytest.raises(ArtifactError, match="sha256 mismatch for 'model/weights.bin'"):
        Artifact.load(out)
    (out / "model" / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="'model/weights.bin' listed in the manifest is missing"):
        Artifact.load(out)


def test_not_an_artifact_and_wrong_schema(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        Artifact.load(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifact.load(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        Artifact.load(tmp_path / "d")


def test_update_rewrites_report_and_rehashes(tmp_path):
    out = _write(tmp_path / "art")
    art = Artifact.load(out)
    art.update({"report.json": {"backends": {"x": 1}}})
    again = Artifact.load(out)
    assert again.report == {"backends": {"x": 1}}
    assert "report.json" in again.manifest["files"]
