"""nm-structure + prune: N:M groups run along the input axis, for Linear and GPT-2 Conv1D."""

import pytest
import torch
from sparsity_helpers import block_layers, load_ir, run_spec

from compiler.errors import SpecError
from compiler.pipeline import Pipeline
from compiler.registry import Registry
from compiler.tiny_models import build_tiny_model
from passes.math.masks import nm_violations


def _groups_ok(matrix: torch.Tensor, n: int, m: int) -> bool:
    out_f, in_f = matrix.shape
    return bool(((matrix.reshape(out_f, in_f // m, m) != 0).sum(2) <= n).all())


@pytest.mark.parametrize("arch,method", [("llama", "wanda"), ("gpt2", "sparsegpt"), ("gpt2", "magnitude")])
def test_every_group_has_at_most_n_nonzeros_on_the_input_axis(tiny_model_dir, arch, method):
    ir = load_ir(tiny_model_dir(arch))
    run = run_spec(ir, f"sparsity-allocation{{method=uniform,target=0.5}},nm-structure{{n=2,m=4}},prune{{method={method}}}")
    names = block_layers(ir)
    for name in names:
        assert ir.plan[name].pattern == "2:4" and ir.plan[name].target_sparsity == 0.5
        assert _groups_ok(ir.weight(name), 2, 4), name
        assert ir.plan[name].measured_sparsity == pytest.approx(0.5)
    if arch == "gpt2":  # Conv1D stores (in, out): the groups must run along its first axis
        raw = ir.get_module("transformer.h.0.mlp.c_fc").weight.data
        assert raw.shape[0] == ir.layers["transformer.h.0.mlp.c_fc"].in_features
        assert ((raw.t().reshape(raw.shape[1], -1, 4) != 0).sum(2) <= 2).all()
        # on the wrong (output) axis the same weights are NOT 2:4
        assert nm_violations(raw, 2, 4) > 0
    assert run.records[-1].metrics["layers_nm"] == len(names)


def test_nm_without_allocation_applies_to_all_block_layers_and_other_ratios(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    run_spec(ir, "nm-structure{n=1,m=8},prune{method=wanda}")
    for name in block_layers(ir):
        assert ir.plan[name].pattern == "1:8" and _groups_ok(ir.weight(name), 1, 8)
        assert ir.plan[name].measured_sparsity == pytest.approx(7 / 8)
    assert ir.plan["lm_head"].pattern is None


def test_layers_whose_inputs_do_not_divide_m_keep_their_plan(tmp_path, tiny_tokenizer):
    d = build_tiny_model("llama", tmp_path / "m", tokenizer=tiny_tokenizer, intermediate=96)
    ir = load_ir(d)
    run = run_spec(ir, "sparsity-allocation{method=uniform,target=0.4},nm-structure{n=16,m=64},prune")
    down = "model.layers.0.mlp.down_proj"  # in_features 96
    assert ir.plan[down].pattern == "unstructured" and ir.plan[down].target_sparsity == 0.4
    assert ir.plan[down].measured_sparsity == pytest.approx(0.4, abs=1 / 96)
    assert ir.plan["model.layers.0.mlp.up_proj"].pattern == "16:64"
    nm_record = run.records[1]
    assert nm_record.metrics["layers_misfit"] == 2 and any(down in d for d in nm_record.diagnostics)


def test_owl_then_nm_policies_are_explicit(tiny_model_dir):
    spec = "outlier-analysis,sparsity-allocation{method=owl,target=0.5},nm-structure{n=2,m=4,policy=%s}"
    ir = load_ir(tiny_model_dir("llama"))
    every = run_spec(ir.clone(), spec % "all")
    assert all(every.ir.plan[n].pattern == "2:4" for n in block_layers(ir))
    assert any("replaced by 2:4" in d for d in every.records[-1].diagnostics)
    kept = run_spec(ir.clone(), spec % "allocation")
    plan = kept.ir.plan
    lower = [n for n in block_layers(ir) if plan[n].pattern == "unstructured"]
    assert lower and all(plan[n].target_sparsity < 0.5 for n in lower)  # outlier-heavy layers stay unstructured
    assert all(plan[n].target_sparsity == 0.5 for n in block_layers(ir) if plan[n].pattern == "2:4")
    assert kept.records[-1].metrics["layers_kept_unstructured"] == len(lower)


def test_allocation_after_nm_keeps_nm_layers(tiny_model_dir):
    ir = run_spec(load_ir(tiny_model_dir("llama")), "nm-structure,sparsity-allocation{method=uniform,target=0.7}", calibrate=False).ir
    assert all(ir.plan[n].pattern == "2:4" and ir.plan[n].target_sparsity == 0.5 for n in block_layers(ir))


@pytest.mark.parametrize("opts,match", [("n=4,m=4", "n must be < m"), ("n=5,m=4", "n must be < m"),
                                        ("n=0,m=4", "must be > 0"), ("n=2,m=0", "must be > 0"), ("n=2,m=-4", "must be > 0")])
def test_invalid_n_m_are_spec_errors(opts, match):
    with pytest.raises(SpecError, match=match):
        Pipeline.from_spec(f"nm-structure{{{opts}}}", Registry.default())
