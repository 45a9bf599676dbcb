"""Failures real clients found in the CLI (issue 15, item 4): each one a one-line error or a visible
result, never a traceback after minutes of work. Tiny models only (compiler/tiny_models.py)."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "examples" / "custom_pass.py")
QUICK = ("--plugin", PLUGIN, "--passes", "threshold-prune")


def _one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _sparsec(*args, env=None, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (stderr piped: not a terminal)."""
    return subprocess.run([sys.executable, "-m", "compiler.cli", *[str(a) for a in args]], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, timeout=timeout, cwd=ROOT)


# -- 1. the output location ----------------------------------------------------------------------
@pytest.mark.parametrize("out", ["/proc/sparsec-out", "/etc/hostname/out", "{file}/sub/out"])
def test_unwritable_output_is_refused_before_the_model_loads(cli, tmp_path, out):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    # the model does not exist: a refusal that names the output proves the check ran before loading
    line = _one_line_error(cli("compile", tmp_path / "no-such-model", "-o", out.replace("{file}", str(a_file)), *QUICK))
    assert "output" in line and "no-such-model" not in line


def _limit_file_size() -> None:
    """A real, kernel-enforced write failure (EFBIG) for files above 64 KB, as a full disk gives ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_write_failure_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    res = _sparsec("compile", tiny_model_dir("llama"), "-o", out, *QUICK, preexec_fn=_limit_file_size,
                   env={"SPARSEC_PROGRESS_AFTER": "600"})  # no progress lines: stderr is the error alone
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write artifact"), res.stderr
    assert "too large" in lines[0].lower()
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# -- 2. a model directory without tokenizer files ------------------------------------------------
@pytest.fixture(scope="session")
def bare_model_dir(tmp_path_factory):
    """bare_model_dir("opt") -> a tiny model saved by `save_pretrained` alone: no tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    from compiler.tiny_models import tiny_config

    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=512))
            cache[arch] = tmp_path_factory.mktemp(f"bare-{arch}")
            model.save_pretrained(cache[arch])
        return cache[arch]

    return make


@pytest.mark.parametrize("arch", ["opt", "gpt2", "qwen2"])
def test_bare_model_compiles_on_random_tokens_and_says_so(cli, bare_model_dir, tmp_path, arch):
    out = tmp_path / "art"
    r = cli("compile", bare_model_dir(arch), "-o", out, "--sparsity", "0.5", "--allocation", "uniform", "--calib-samples", "2",
            "--calib-seqlen", "16")
    assert r.exit_code == 0, r.output
    assert "no tokenizer" in r.output  # the note reaches the user, not only the manifest
    from compiler.artifact import Artifact

    cal = Artifact.load(out).manifest["calibration"]
    assert cal["source"] == "random-tokens" and cal["samples"] == 2 and cal["seqlen"] == 16
    assert Artifact.load(out).report["sparsity"]["overall_measured"] == pytest.approx(0.5, abs=0.02)


def test_bare_model_compiles_streamed(cli, bare_model_dir, tmp_path):
    """The streamed compile (compiler/streaming) treats an empty-vocabulary tokenizer as none, as the
    in-memory load does (before: tracing failed on zero tokens)."""
    out = tmp_path / "art"
    r = cli("compile", bare_model_dir("gpt2"), "-o", out, "--stream", "--sparsity", "0.5", "--allocation", "uniform",
            "--calib-samples", "2", "--calib-seqlen", "16")
    assert r.exit_code == 0, r.output
    from compiler.artifact import Artifact

    assert Artifact.load(out).manifest["calibration"]["source"] == "random-tokens"


def test_text_calibration_without_tokenizer_is_refused_before_loading(cli, bare_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("some text to calibrate on\n\nmore text")
    line = _one_line_error(cli("compile", bare_model_dir("opt"), "-o", tmp_path / "o", "--calib", calib))
    assert "--tokenizer" in line and "no tokenizer" in line
    assert not (tmp_path / "o").exists()


def test_tokenizer_option_calibrates_on_text(cli, bare_model_dir, tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"paragraph {i}: sparsec reads this text to calibrate the model." for i in range(40)))
    out = tmp_path / "art"
    r = cli("compile", bare_model_dir("gpt2"), "-o", out, "--tokenizer", tiny_model_dir("gpt2"), "--calib", calib,
            "--sparsity", "0.5", "--allocation", "uniform", "--calib-samples", "2", "--calib-seqlen", "16")
    assert r.exit_code == 0, r.output
    from compiler.artifact import Artifact

    m = Artifact.load(out).manifest
    assert m["calibration"]["source"] == str(calib) and m["source"]["tokenizer"] == str(tiny_model_dir("gpt2").resolve())
    assert (out / "model" / "tokenizer.json").is_file()  # the artifact now carries it


def test_bad_tokenizer_is_one_line(cli, bare_model_dir, tmp_path):
    line = _one_line_error(cli("compile", bare_model_dir("opt"), "-o", tmp_path / "o", "--tokenizer", tmp_path / "nothing"))
    assert "tokenizer" in line


# -- 3. an artifact compiled without --backend -----------------------------------------------------
def test_lower_an_artifact_compiled_without_backend_then_verify(cli, tiny_model_dir, tmp_path):
    from compiler.artifact import Artifact

    art = tmp_path / "art"
    assert cli("compile", tiny_model_dir("llama"), "-o", art, "--sparsity", "0.5", "--allocation", "uniform",
               "--calib-samples", "2", "--calib-seqlen", "16").exit_code == 0
    line = _one_line_error(cli("verify", art, "--backend", "onnxruntime", "--runs", "2"))
    assert f"sparsec lower {art} --backend onnxruntime" in line
    model_bytes = (art / "model" / "model.safetensors").read_bytes()

    r = cli("lower", art, "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    m = Artifact.load(art).manifest  # sha256 of every file, the new graph included
    assert m["lowering"]["lowered_for"] == ["onnxruntime"] and "onnx/model.onnx" in m["files"]
    assert (art / "model" / "model.safetensors").read_bytes() == model_bytes  # the compiled model is untouched
    assert not list(tmp_path.glob(".art.*"))  # no temp directory left behind

    r = cli("verify", art, "--backend", "onnxruntime", "--runs", "2", "--seqlen", "16", "--json")
    assert r.exit_code == 0, r.output
    assert max(m["lowering"]["numerics"].values()) < 1e-3  # the graph computes what the compiled torch model does
    result = Artifact.load(art).report["backends"]["onnxruntime"]
    assert result["passed"] and 0.5 < result["cosine"] <= 1.0 + 1e-6  # 50% of a random tiny model vs its dense self


def test_lower_bad_input_is_one_line(cli, tiny_model_dir, tmp_path):
    assert "does not exist" in _one_line_error(cli("lower", tmp_path / "nothing", "--backend", "onnxruntime"))


# -- 4. the offline-hub message ------------------------------------------------------------------
def test_offline_hub_error_does_not_advise_what_is_already_set(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_line_error(cli("compile", "someorg/no-such-model", "-o", tmp_path / "o"))
    assert "HF_HUB_OFFLINE is set" in line and "set HF_HUB_OFFLINE=1" not in line
    from compiler.trace import hub_hint

    assert "with HF_HUB_OFFLINE=1 only the local" in hub_hint({})  # online: the variable is the way to stay local
    assert "TRANSFORMERS_OFFLINE is set" in hub_hint({"TRANSFORMERS_OFFLINE": "1"})


# -- 5. progress when stderr is not a terminal ---------------------------------------------------
def test_compile_logs_progress_lines_when_stderr_is_piped(tiny_model_dir, tmp_path):
    res = _sparsec("compile", tiny_model_dir("llama"), "-o", tmp_path / "art", "--sparsity", "0.5", "--allocation", "uniform",
                   "--calib-samples", "2", "--calib-seqlen", "16", env={"SPARSEC_PROGRESS_AFTER": "0"})
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    stamped = [line for line in lines if re.match(r"^\[\s*\d+\.\d+s\] ", line)]
    assert any(line.endswith("] pass 1/2 sparsity-allocation") for line in stamped), res.stderr
    assert any(line.endswith("] pass 2/2 prune") for line in stamped), res.stderr
    assert any(line.endswith("] prune: 1/2") for line in stamped) and any(line.endswith("] prune: 2/2") for line in stamped)
    assert any(re.search(r"\] pass prune done in \d+\.\ds$", line) for line in stamped)
    assert "\x1b[" not in res.stderr  # plain lines, no terminal control codes


# -- 6. a bad result is flagged; inspect fits 80 columns ------------------------------------------
def test_poor_quality_is_flagged_and_inspect_fits_80_columns(cli, minilm_dir, tmp_path):
    from compiler.artifact import Artifact
    from compiler.report import quality_verdict

    art = tmp_path / "art"
    r = cli("compile", minilm_dir, "-o", art, "--sparsity", "0.9", "--method", "magnitude", "--allocation",
            "uniform", "--calib-samples", "2", "--calib-seqlen", "16", "--backend", "onnxruntime", "--runs", "2",
            "--seqlen", "16")
    assert r.exit_code == 0, r.output  # no gate was set: the gates "pass" ...
    cosine = Artifact.load(art).report["backends"]["onnxruntime"]["cosine"]
    assert cosine < 0.90, cosine  # ... on a model that 90% magnitude pruning broke
    assert "passed=True" in r.output and "quality: poor" in r.output  # ... and the summary says how bad it is
    assert quality_verdict(Artifact.load(art).report)["verdict"] == "poor"
    assert "quality: poor" in (art / "report.md").read_text()

    res = _sparsec("inspect", art, env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    assert "…" not in res.stdout, res.stdout  # nothing cut
    assert "block k = encoder.layer.<k>" in res.stdout and "attention.self.query" in res.stdout
    assert "quality: poor" in res.stdout
