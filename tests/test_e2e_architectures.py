"""`sparsec compile` end to end through the CLI on six tiny architectures and the real MiniLM:
plan targets and measured sparsity in the manifest, and OUT/model reloads with transformers."""

import json
import math

import pytest
import torch

from compiler.tiny_models import build_tiny_model

CALIB = ("--calib-samples", "4", "--calib-seqlen", "32")

# (arch, extra CLI args, expected pattern of block layers, expected mean target)
CASES = [
    ("llama", (), "unstructured", 0.5),
    ("opt", ("--method", "sparsegpt", "--sparsity", "0.6"), "unstructured", 0.6),
    ("gpt2", ("--pattern", "2:4"), "2:4", 0.5),
    ("bert", ("--allocation", "uniform", "--method", "magnitude", "--sparsity", "0.7"), "unstructured", 0.7),
    ("qwen2", ("--allocation", "alphapruning", "--method", "sparsegpt", "--sparsity", "0.6"), "unstructured", 0.6),
    ("mistral", ("--passes", "outlier-analysis{m=3},sparsity-allocation{granularity=layer,target=0.55},prune{method=wanda}"),
     "unstructured", 0.55),
]


def _load(model_dir, model_type):
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if model_type == "causal-lm" else AutoModel
    return auto.from_pretrained(model_dir)


def _check_artifact(out, expected_pattern, expected_mean):
    manifest = json.loads((out / "manifest.json").read_text())
    plan = manifest["plan"]
    blocks = {n for b in manifest["structure"]["blocks"] for n in b["layers"]}
    pruned = [n for n in plan if n in blocks]
    assert pruned
    for name, p in plan.items():
        if name not in blocks:
            assert p["target_sparsity"] is None and p["measured_sparsity"] < 0.01, name
            continue
        assert p["pattern"] == expected_pattern, name
        assert abs(p["measured_sparsity"] - p["target_sparsity"]) <= 1 / 16, name
    params = sum(plan[n]["params"] for n in pruned)
    mean = sum(plan[n]["target_sparsity"] * plan[n]["params"] for n in pruned) / params
    assert mean == pytest.approx(expected_mean, abs=1e-6)
    model = _load(out / "model", manifest["source"]["model_type"])
    for name in pruned:
        w = model.get_submodule(name).weight
        assert float((w == 0).float().mean()) == pytest.approx(plan[name]["measured_sparsity"], abs=1e-6), name
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        out_tensor = model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    assert torch.isfinite(out_tensor).all()
    return manifest


@pytest.mark.parametrize("arch,extra,pattern,mean", CASES, ids=[c[0] for c in CASES])
def test_compile_tiny_architecture(cli, tiny_model_dir, tmp_path, arch, extra, pattern, mean):
    out = tmp_path / arch
    r = cli("compile", tiny_model_dir(arch), "-o", out, *CALIB, *extra)
    assert r.exit_code == 0, r.output
    manifest = _check_artifact(out, pattern, mean)
    if "outlier-analysis" in manifest["pipeline"]:
        assert set(manifest["analyses"]["outlier_ratio"]) == {n for b in manifest["structure"]["blocks"] for n in b["layers"]}
    assert (out / "plots" / "sparsity.png").is_file()


def test_compile_real_minilm_and_evaluate_it(cli, minilm_dir, tmp_path):
    out = tmp_path / "minilm"
    r = cli("compile", "minilm", "-o", out, *CALIB, "--sparsity", "0.5", "--allocation", "owl")
    assert r.exit_code == 0, r.output
    manifest = _check_artifact(out, "unstructured", 0.5)
    targets = {p["target_sparsity"] for p in manifest["plan"].values() if p["target_sparsity"] is not None}
    assert len(targets) == 6 and max(targets) - min(targets) == pytest.approx(0.16)  # OWL, one ratio per block
    assert (out / "model" / "modules.json").is_file()  # still a sentence-transformers model
    r = cli("eval", out, "--max-texts", "24", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["metric"] == "embedding_cosine" and res["samples"] == 24
    assert 0.5 < res["compiled"] < 0.999


# -- bad input ---------------------------------------------------------------------------------------------
def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for f in fragments:
        assert f in lines[0], result.output


@pytest.mark.parametrize("args,fragment", [
    (("--sparsity", "1.0"), "target must be in [0, 1)"),
    (("--sparsity", "-0.2"), "target must be in [0, 1)"),
    (("--pattern", "4:4"), "n must be < m"),
    (("--pattern", "0:4"), "must be > 0"),
    (("--passes", "nm-structure{n=2,m=0},prune"), "must be > 0"),
    (("--passes", "sparsity-allocation{method=owl},prune"), "run outlier-analysis first"),
])
def test_bad_options_fail_with_one_line(cli, tiny_model_dir, tmp_path, args, fragment):
    out = tmp_path / "bad"
    _one_line_error(cli("compile", tiny_model_dir("llama"), "-o", out, *CALIB, *args), fragment)
    assert not out.exists()


def test_nan_weights_name_the_layer(cli, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    d = build_tiny_model("llama", tmp_path / "nan", tokenizer=tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(d)
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = math.nan
    model.save_pretrained(d)
    _one_line_error(cli("compile", d, "-o", tmp_path / "out", *CALIB), "model.layers.1.mlp.down_proj", "NaN")


def test_calibration_shorter_than_seqlen(cli, tiny_model_dir, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("a few words only\n")
    _one_line_error(cli("compile", tiny_model_dir("llama"), "-o", tmp_path / "out", "--calib", f,
                        "--calib-samples", "2", "--calib-seqlen", "64"), "fewer than one sample")


@pytest.mark.parametrize("factory,method", [("tests.test_trace:user_factory", "sparsegpt"), ("tests.test_trace:stack_factory", "wanda")])
def test_compile_user_modules_without_tokenizer(cli, tmp_path, factory, method):
    """Plain modules (Conv2d + Linear, one root block / a user ModuleList) calibrate on their example inputs."""
    out = tmp_path / "user"
    r = cli("compile", factory, "-o", out, "--method", method, "--sparsity", "0.6", "--eval-data", "eval")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    planned = {n: p for n, p in manifest["plan"].items() if p["target_sparsity"] is not None}
    assert planned and all(abs(p["measured_sparsity"] - p["target_sparsity"]) < 0.05 for p in planned.values())
    evaluation = json.loads((out / "report.json").read_text())["evaluation"]
    assert evaluation["metric"] == "output_cosine" and 0 < evaluation["compiled"] < 1
