"""Failures real clients found in the CLI (issue 15, item 4): each one a one-line error or a visible
result, never a traceback after minutes of work. Tiny models only (compiler/tiny_models.py)."""

from __future__ import annotations

import os
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
    res = _sparsec("compile", tiny_model_dir("llama"), "-o", out, *QUICK, preexec_fn=_limit_file_size)
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
