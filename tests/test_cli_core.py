"""The compile CLI end to end with a plugin pass, inspect, and every core bad-input path:
one-line error, non-zero exit, nothing written to OUT."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compiler.artifact import Artifact

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "examples" / "custom_pass.py")


def _assert_one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output


def test_compile_with_plugin_pass_writes_a_complete_artifact(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    r = cli("compile", tiny_model_dir("llama"), "-o", out, "--plugin", PLUGIN,
            "--passes", "threshold-prune{threshold=0.01}", "--dump-ir", tmp_path / "dump")
    assert r.exit_code == 0, r.output
    art = Artifact.load(out)
    m = art.manifest
    for key in ("schema_version", "source", "pipeline", "calibration", "plan", "analyses", "files"):
        assert key in m
    assert m["pipeline"] == "threshold-prune{threshold=0.01}"
    layer = next(iter(m["plan"].values()))
    assert set(layer) >= {"block", "params", "target_sparsity", "measured_sparsity", "pattern", "quant"}
    assert 0 < layer["measured_sparsity"] < 1
    assert m["plan"]["lm_head"]["measured_sparsity"] == 0.0  # outside the blocks: untouched
    assert (out / "report.md").read_text().startswith("# sparsec report")
    assert (out / "plots" / "sparsity.png").is_file()
    assert list((tmp_path / "dump").glob("01-threshold-prune.json"))
    # the transformed model is a loadable HF directory with real zeros
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    w = model.get_submodule(next(iter(m["plan"]))).weight
    assert abs(float((w == 0).float().mean()) - layer["measured_sparsity"]) < 1e-6
    r = cli("inspect", out)
    assert r.exit_code == 0 and "threshold-prune" in r.output


def test_inspect_tampered_artifact(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    assert cli("compile", tiny_model_dir("gpt2"), "-o", out, "--plugin", PLUGIN, "--passes", "threshold-prune").exit_code == 0
    with open(out / "model" / "model.safetensors", "ab") as f:
        f.write(b"x")
    _assert_one_line_error(cli("inspect", out))


@pytest.mark.parametrize("args", [
    ["/no/such/model"],
    ["tests"],
    ["{tiny}", "--passes", "no-such-pass"],
    ["{tiny}", "--plugin", PLUGIN, "--passes", "threshold-prune{threshold=abc}"],
    ["{tiny}", "--plugin", PLUGIN, "--passes", "threshold-prune{threshold=-1}"],
    ["{tiny}", "--plugin", PLUGIN, "--passes", "threshold-prune{bogus=1}"],
    ["{tiny}", "--recipe", "{bad_yaml}"],
    ["{tiny}", "--plugin", "{boom}", "--passes", "threshold-prune"],
    ["{tiny}", "--plugin", PLUGIN, "--plugin", "{dup}", "--passes", "threshold-prune"],
])
def test_bad_input_one_line_and_nothing_written(cli, tiny_model_dir, tmp_path, args):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("pipeline: [threshold-prune: {\n")
    boom = tmp_path / "boom.py"
    boom.write_text("import sys\nraise ImportError('plugin needs a missing library')\n")
    dup = tmp_path / "dup.py"
    dup.write_text((ROOT / "examples" / "custom_pass.py").read_text())
    subst = {"{tiny}": str(tiny_model_dir("llama")), "{bad_yaml}": str(bad_yaml), "{boom}": str(boom), "{dup}": str(dup)}
    out = tmp_path / "out"
    _assert_one_line_error(cli("compile", *[subst.get(a, a) for a in args], "-o", out))
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("content", [b"", b"\n\n   \n", b"\xff\xfe\x00bad bytes"])
def test_bad_calibration_files(cli, tiny_model_dir, tmp_path, content):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    plugin_with_calib = tmp_path / "needs_calib.py"
    plugin_with_calib.write_text(
        "from dataclasses import dataclass\n"
        "from compiler import Pass, PassResult, register_pass\n"
        "@register_pass\n@dataclass(frozen=True)\nclass NeedsCalib(Pass):\n"
        "    name = 'needs-calib'\n    needs_calibration = True\n"
        "    def call(self, ir, ctx):\n"
        "        cal = ctx.require_calibration(self.name)\n"
        "        return PassResult(ir, modified=False, metrics={'samples': len(cal.samples)})\n")
    out = tmp_path / "out"
    r = cli("compile", tiny_model_dir("llama"), "-o", out, "--plugin", plugin_with_calib, "--passes", "needs-calib",
            "--calib", calib)
    _assert_one_line_error(r)
    assert "calib" in r.output
    assert not out.exists()


def test_out_exists_without_force(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = cli("compile", tiny_model_dir("llama"), "-o", out, "--plugin", PLUGIN, "--passes", "threshold-prune")
    _assert_one_line_error(r)
    assert "--force" in r.output
    assert (out / "keep.txt").read_text() == "precious"
    r = cli("compile", tiny_model_dir("llama"), "-o", out, "--plugin", PLUGIN, "--passes", "threshold-prune", "--force")
    assert r.exit_code == 0 and not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_sigterm_during_compile_leaves_no_artifact(tiny_model_dir, tmp_path):
    marker = tmp_path / "started"
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import time\nfrom dataclasses import dataclass\nfrom pathlib import Path\n"
        "from compiler import Pass, PassResult, register_pass\n"
        "@register_pass\n@dataclass(frozen=True)\nclass Slow(Pass):\n"
        "    name = 'slow'\n"
        f"    def call(self, ir, ctx):\n        Path({str(marker)!r}).write_text('x')\n        time.sleep(60)\n"
        "        return PassResult(ir, modified=False)\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "compiler.cli", "compile", str(tiny_model_dir("llama")), "-o", str(out),
                             "--plugin", str(slow), "--passes", "slow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_passes_lists_plugin_options(cli):
    r = cli("passes", "threshold-prune", "--plugin", PLUGIN)
    assert r.exit_code == 0
    assert "threshold" in r.output and "0.01" in r.output and "float" in r.output


def test_backends_lists_without_optional_runtimes(cli):
    r = cli("backends")
    assert r.exit_code == 0
    assert "onnxruntime" in r.output and "tensorrt" in r.output


def test_backends_check_exit_codes(cli):
    r = cli("backends", "--check", "onnxruntime")
    assert r.exit_code == 0 and "onnxruntime: available" in r.output
    r = cli("backends", "--check", "no-such-backend")
    assert r.exit_code == 2 and "unknown backend 'no-such-backend'" in r.output
    import importlib.util
    if importlib.util.find_spec("tensorrt") is None:  # this machine has no TensorRT: the check says why, exit 3
        r = cli("backends", "--check", "tensorrt")
        assert r.exit_code == 3 and "tensorrt: unavailable" in r.output
