"""sparsity-allocation: OWL properties and the reference formula, AlphaPruning, manual YAML, validation."""

import pytest
import torch
from sparsity_helpers import block_layers, load_ir, run_spec

from compiler.errors import PassError, SpecError
from compiler.pipeline import Pipeline
from compiler.registry import Registry
from passes.math.alpha import fit_power_law, layer_alpha
from passes.math.owl import alpha_allocation, fit_mean, owl_allocation


def _wmean(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


# -- OWL math ---------------------------------------------------------------------------------------
def test_owl_hand_computed_three_blocks_matches_reference_formula():
    # LOD 1%, 2%, 4%; λ = 0.08 → normalised [0, 0.16/3, 0.16], mean 0.21333/3 = 0.071111
    # density = LOD_n − mean + 0.5; sparsity = 1 − density
    alloc = owl_allocation([0.01, 0.02, 0.04], target=0.5, lam=0.08)
    expected = [0.5 + 0.16 * 4 / 9 - 0.0, 0.5 + 0.16 * 4 / 9 - 0.16 / 3, 0.5 + 0.16 * 4 / 9 - 0.16]
    assert alloc.sparsities == pytest.approx(expected, abs=1e-12)
    assert alloc.sparsities == pytest.approx([0.571111111, 0.517777778, 0.411111111], abs=1e-8)
    assert alloc.clamped == 0


@pytest.mark.parametrize("seed", range(5))
def test_owl_properties_mean_spread_and_monotonicity(seed):
    g = torch.Generator().manual_seed(seed)
    lods = (torch.rand(12, generator=g) * 0.05).tolist()
    target, lam = 0.3 + 0.1 * seed, 0.05 + 0.01 * seed
    alloc = owl_allocation(lods, target, lam)
    s = alloc.sparsities
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)  # normalised to exactly [0, 2λ]
    order = sorted(range(len(lods)), key=lambda i: lods[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))  # more outliers ⇒ lower sparsity


def test_owl_keeps_the_parameter_weighted_mean_when_blocks_differ_in_size():
    lods, weights = [0.01, 0.02, 0.04], [1.0, 2.0, 1.0]
    alloc = owl_allocation(lods, 0.5, 0.08, weights)
    assert _wmean(alloc.sparsities, weights) == pytest.approx(0.5, abs=1e-12)
    # shifted by the weighted mean of the normalised LODs: (0 + 2·0.16/3 + 0.16) / 4 = 0.0666…
    assert alloc.sparsities == pytest.approx([0.5 + 0.2 / 3, 0.5 + 0.2 / 3 - 0.16 / 3, 0.5 + 0.2 / 3 - 0.16], abs=1e-12)
    assert sum(alloc.sparsities) / 3 != pytest.approx(0.5, abs=1e-4)  # the plain mean would be wrong


def test_equal_lods_give_a_uniform_allocation():
    assert owl_allocation([0.02] * 4, 0.6, 0.08).sparsities == pytest.approx([0.6] * 4)


@pytest.mark.parametrize("target", [0.0, 0.03, 0.995])
def test_clamping_redistributes_to_keep_the_mean(target):
    lods, weights = [0.0, 0.01, 0.02, 0.05, 0.2], [3.0, 1.0, 1.0, 2.0, 1.0]
    alloc = owl_allocation(lods, target, 0.08, weights)
    assert all(0.0 <= s <= max(0.99, target) for s in alloc.sparsities)
    assert _wmean(alloc.sparsities, weights) == pytest.approx(target, abs=1e-9)
    assert alloc.mean == pytest.approx(target, abs=1e-9)
    assert list(alloc.sparsities) == sorted(alloc.sparsities, reverse=True)  # order kept
    if 0 < target < 0.99:
        assert alloc.clamped > 0


def test_fit_mean_rejects_an_unreachable_target():
    with pytest.raises(ValueError):
        fit_mean([0.0, 0.1], [1.0, 1.0], target=1.0, hi=0.99)


def test_alpha_allocation_higher_alpha_is_pruned_more():
    alloc = alpha_allocation([2.0, 4.0, 3.0], 0.5, 0.1, [1.0, 1.0, 2.0])
    assert alloc.sparsities[1] > alloc.sparsities[2] > alloc.sparsities[0]
    assert max(alloc.sparsities) - min(alloc.sparsities) == pytest.approx(0.2)
    assert _wmean(alloc.sparsities, [1, 1, 2]) == pytest.approx(0.5, abs=1e-12)


# -- AlphaPruning's metric ----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_power_law_fit_recovers_the_exponent_of_pareto_samples(alpha):
    u = torch.rand(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eigs = (1.0 - u).pow(-1.0 / (alpha - 1.0)).sort().values  # p(x) ∝ x^-alpha on [1, ∞)
    fit = fit_power_law(eigs)
    assert fit.alpha == pytest.approx(alpha, rel=0.1)


def test_layer_alpha_is_scale_invariant_and_lower_for_heavy_tailed_spectra():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    assert layer_alpha(3.0 * w) == pytest.approx(layer_alpha(w), rel=1e-6)
    u, _, v = torch.linalg.svd(w, full_matrices=False)
    heavy = u @ torch.diag(torch.arange(1, 97, dtype=torch.float32).pow(-1.5).flip(0) * 10) @ v
    assert layer_alpha(heavy) < layer_alpha(w)


# -- the pass ------------------------------------------------------------------------------------------
def test_uniform_sets_every_block_layer_and_keeps_heads_dense(tiny_model_dir):
    ir = run_spec(load_ir(tiny_model_dir("llama")), "sparsity-allocation{method=uniform,target=0.6}", calibrate=False).ir
    for name in block_layers(ir):
        assert ir.plan[name].target_sparsity == 0.6 and ir.plan[name].pattern == "unstructured"
    assert ir.plan["lm_head"].target_sparsity is None


def test_owl_without_outlier_analysis_asks_for_it(tiny_model_dir):
    with pytest.raises(PassError, match="run outlier-analysis first"):
        run_spec(load_ir(tiny_model_dir("llama")), "sparsity-allocation{method=owl}", calibrate=False)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_owl_pass_weighted_mean_and_direction(tiny_model_dir, granularity):
    run = run_spec(load_ir(tiny_model_dir("llama")), f"outlier-analysis,sparsity-allocation{{method=owl,target=0.6,granularity={granularity}}}")
    ir = run.ir
    names = block_layers(ir)
    targets = [ir.plan[n].target_sparsity for n in names]
    params = [ir.layers[n].params for n in names]
    assert _wmean(targets, params) == pytest.approx(0.6, abs=1e-9)
    assert max(targets) - min(targets) == pytest.approx(0.16, abs=1e-9)
    ratios = ir.analyses["block_outlier_ratio" if granularity == "block" else "outlier_ratio"]
    key = (lambda n: ir.layers[n].block) if granularity == "block" else (lambda n: n)
    most = max(names, key=lambda n: ratios[key(n)])
    least = min(names, key=lambda n: ratios[key(n)])
    assert ir.plan[most].target_sparsity < ir.plan[least].target_sparsity
    metrics = run.records[-1].metrics
    assert metrics["achieved_mean"] == pytest.approx(0.6) and metrics["layers_dense"] == 1


def test_alphapruning_pass_needs_no_calibration(tiny_model_dir):
    run = run_spec(load_ir(tiny_model_dir("qwen2")), "sparsity-allocation{method=alphapruning,target=0.7,lam=0.05}", calibrate=False)
    ir = run.ir
    names = block_layers(ir)
    assert _wmean([ir.plan[n].target_sparsity for n in names], [ir.layers[n].params for n in names]) == pytest.approx(0.7, abs=1e-9)
    alphas = run.records[0].metrics["alpha"]
    hi, lo = max(alphas, key=alphas.get), min(alphas, key=alphas.get)
    group = run.records[0].metrics["group_sparsity"]
    assert group[hi] > group[lo]
    assert set(ir.analyses["esd_alpha"]) == set(names)


def test_manual_yaml_exact_names_regexes_null_and_default(tiny_model_dir, tmp_path):
    f = tmp_path / "alloc.yaml"
    f.write_text("model.layers.0.self_attn.q_proj: 0.9\n'.*mlp\\..*': 0.7\n'model\\.layers\\.1\\.self_attn\\.v_proj': null\n")
    run = run_spec(load_ir(tiny_model_dir("llama")), f"sparsity-allocation{{method=manual,file={f},target=0.3}}", calibrate=False)
    plan = run.ir.plan
    assert plan["model.layers.0.self_attn.q_proj"].target_sparsity == 0.9
    assert plan["model.layers.1.mlp.down_proj"].target_sparsity == 0.7
    assert plan["model.layers.1.self_attn.v_proj"].target_sparsity is None
    assert plan["model.layers.0.self_attn.k_proj"].target_sparsity == 0.3
    assert any("default target" in d for d in run.records[0].diagnostics)


@pytest.mark.parametrize("content,match", [("nothing\\.here: 0.5\n", "matches no prunable layer"),
                                           ("model.layers.0.mlp.up_proj: 1.5\n", r"in \[0, 1\)"),
                                           ("[1, 2]\n", "must be a mapping")])
def test_manual_yaml_errors(tiny_model_dir, tmp_path, content, match):
    f = tmp_path / "alloc.yaml"
    f.write_text(content)
    with pytest.raises(PassError, match=match):
        run_spec(load_ir(tiny_model_dir("llama")), f"sparsity-allocation{{method=manual,file={f}}}", calibrate=False)


@pytest.mark.parametrize("spec,match", [
    ("sparsity-allocation{target=1.0}", r"target must be in \[0, 1\)"),
    ("sparsity-allocation{target=-0.1}", r"target must be in \[0, 1\)"),
    ("sparsity-allocation{method=manual}", "needs file"),
    ("sparsity-allocation{dense=(unclosed}", "invalid regular expression"),
    ("sparsity-allocation{method=magic}", "method"),
])
def test_invalid_options_are_spec_errors(spec, match):
    with pytest.raises(SpecError, match=match):
        Pipeline.from_spec(spec, Registry.default())


def test_spec_round_trips():
    reg = Registry.default()
    p = Pipeline.from_spec('sparsity-allocation{method=alphapruning,target=0.7,lam=0.1,granularity=layer,dense="lm_head;proj_out"}', reg)
    assert Pipeline.from_spec(p.spec(), reg) == p
