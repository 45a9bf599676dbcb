"""sparsity-allocation{method=auto}: candidate math, masks equal to the prune pass's, temporary masks
leave the weights alone, the outlier-protecting choice on a model built to need it, MiniLM, plugins,
the CLI default (manifest, report, plot, inspect)."""

import json

import pytest
import torch
from sparsity_helpers import context, load_ir

from compiler.errors import PassError, PluginError, SpecError
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline
from compiler.registry import Registry, register_allocation
from passes.allocation_auto import batches, collect_input_norms, dense_reference, score_candidate, split_holdout, temporary_masks
from passes.math.alpha import layer_alpha
from passes.math.candidates import (
    best_index,
    finalist_count,
    finalists,
    flat_ranks,
    gram_alpha,
    group_candidates,
    keep_mask,
    row_ranks,
    screen_size,
    token_kl,
)
from passes.math.masks import layer_mask, row_mask
from passes.math.scores import wanda_scores

FAST = "grid_lam=0.05;0.15,grid_m=5"  # a small grid keeps the tests quick


def _wmean(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


# -- pure math ----------------------------------------------------------------------------------------
def test_rank_masks_prune_exactly_what_row_and_layer_masks_prune():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(24, 40, generator=g)
    rr, fr = row_ranks(scores), flat_ranks(scores)
    assert rr.dtype == torch.int16
    for s in (0.0, 0.3, 0.55, 0.9):
        assert torch.equal(~keep_mask(rr, s, per_row=True), row_mask(scores, s))
        assert torch.equal(~keep_mask(fr, s, per_row=False), layer_mask(scores, s))


def test_group_candidates_all_keep_the_weighted_mean_and_uniform_comes_first():
    weights, lods, alphas = [1.0, 3.0, 2.0, 2.0], {5.0: [0.01, 0.03, 0.02, 0.01], 3.0: [0.02, 0.05, 0.02, 0.03]}, [3.0, 2.5, 4.0, 3.5]
    cands = group_candidates(0.6, weights, (0.0, 0.04, 0.1), lods, alphas)
    assert cands[0].name == "uniform" and cands[0].sparsities == (0.6,) * 4
    # λ = 0 is uniform and skipped; 2 λ × (2 OWL m + AlphaPruning + 2 depth ramps) + OWL's published defaults
    assert len(cands) == 1 + 2 * (2 + 1 + 2) + 1 and "owl(lam=0.08,m=5)" in {c.name for c in cands}
    only_m3 = group_candidates(0.6, weights, (0.04,), lods, alphas, families=("owl",), grid_m=(3.0,))
    assert [c.name for c in only_m3] == ["uniform", "owl(lam=0.04,m=3)", "owl(lam=0.08,m=5)"]
    assert len({c.name for c in cands}) == len(cands)
    for c in cands:
        assert _wmean(c.sparsities, weights) == pytest.approx(0.6, abs=1e-9), c.name
    owl = next(c for c in cands if c.name == "owl(lam=0.1,m=5)")
    assert min(owl.sparsities) == owl.sparsities[1]  # the most outliers, the lowest sparsity
    up = next(c for c in cands if c.name == "depth-up(lam=0.04)").sparsities
    assert list(up) == sorted(up) and up[-1] - up[0] == pytest.approx(0.08)
    assert group_candidates(0.6, weights, (0.1,), lods, alphas, families=())[0].name == "uniform"


def test_racing_screens_a_quarter_and_always_keeps_uniform():
    # screening only from 16 held-out samples on, on at least 4 (2-sample screening misranked on SmolLM2)
    assert [screen_size(n) for n in (1, 3, 4, 8, 10, 16, 40)] == [0, 0, 0, 0, 0, 4, 10]
    assert [finalist_count(n) for n in (3, 16, 25)] == [4, 4, 7]
    assert finalists([0.1, 0.5, 0.3, 0.9, 0.2], 2) == [0, 1, 3]  # uniform (index 0) always goes on
    assert finalists([0.9, 0.5, 0.5, 0.1], 2) == [0, 1]  # ties: the earlier candidate


def test_best_index_prefers_the_first_of_equal_scores_and_kl_of_equal_distributions_is_zero():
    assert best_index([0.5, 0.7, 0.7, 0.1]) == 1
    assert best_index([0.5, 0.5]) == 0
    logits = torch.randn(2, 5, 11)
    assert token_kl(torch.log_softmax(logits, -1), logits).abs().max() < 1e-6
    assert (token_kl(torch.log_softmax(logits, -1), logits * 0.5) > 0).all()


def test_gram_alpha_equals_the_svd_alpha():
    w = torch.randn(96, 40, generator=torch.Generator().manual_seed(1)) @ torch.diag(torch.linspace(0.1, 3, 40))
    assert gram_alpha(w) == pytest.approx(layer_alpha(w), rel=1e-6)
    assert gram_alpha(w.t()) == pytest.approx(layer_alpha(w.t()), rel=1e-6)


def test_split_holdout_keeps_at_least_one_sample_on_each_side():
    samples = [{"input_ids": torch.full((1, 4), i)} for i in range(8)]
    stats, held = split_holdout(samples, 0.25)
    assert [int(s["input_ids"][0, 0]) for s in held] == [6, 7] and len(stats) == 6
    assert len(split_holdout(samples[:2], 0.9)[1]) == 1
    assert split_holdout(samples[:1], 0.25) == (samples[:1], samples[:1])
    assert [b["input_ids"].shape[0] for b in batches(samples, 3)] == [3, 3, 2]


# -- the search on real models --------------------------------------------------------------------------
def test_temporary_masks_match_real_masking_and_leave_the_weights_alone(tiny_model_dir):
    ir = load_ir(tiny_model_dir("gpt2"))  # GPT-2 Conv1D: the (in, out) weight layout
    ctx = context(ir)
    names = [n for b in ir.blocks for n in b.layers]
    samples = ctx.calibration.samples
    norms = collect_input_norms(ir, samples, names)
    ref = dense_reference(ir, samples[:2])
    assert ref.kind == "kl"
    before = {n: ir.weight(n).clone() for n in names}
    ranks = {n: row_ranks(wanda_scores(ir.weight(n), norms[n].sq_norm)) for n in names}
    keep = {n: (lambda r=ranks[n]: keep_mask(r, 0.6, True)) for n in names}
    score = score_candidate(ir, ref, keep)
    assert all(torch.equal(ir.weight(n), before[n]) for n in names)
    for n in names:  # the same masks applied for real give the same score
        ir.set_weight(n, before[n] * keep[n]())
    assert score == pytest.approx(score_candidate(ir, ref, {}), rel=1e-5, abs=1e-7)
    assert score < 0  # -KL of a pruned model
    with pytest.raises(RuntimeError):  # restored even when the forward pass fails
        with temporary_masks(ir, {names[0]: lambda: torch.ones(3, dtype=torch.bool)}):
            ir.module(**samples[0])
    assert torch.equal(ir.weight(names[0]), before[names[0]] * keep[names[0]]())


def _llama_with_an_outlier_block(directory, tokenizer, block=2, layers=4):
    """A tiny Llama in which OWL's premise holds by construction: block `block` gets strong activation
    outliers (2 input channels of its attention and MLP scaled 30x by the norms' gains) and carries the
    function (the other blocks' output projections are scaled down 10x, so their errors matter less)."""
    from transformers import AutoModelForCausalLM

    from compiler.tiny_models import build_tiny_model

    path = build_tiny_model("llama", directory, tokenizer=tokenizer, layers=layers)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i == block:
                layer.input_layernorm.weight[:2].mul_(30.0)
                layer.post_attention_layernorm.weight[:2].mul_(30.0)
            else:
                layer.self_attn.o_proj.weight.mul_(0.1)
                layer.mlp.down_proj.weight.mul_(0.1)
    model.save_pretrained(path)
    return path


def test_auto_protects_the_block_with_strong_outliers(tmp_path, tiny_tokenizer):
    ir = load_ir(_llama_with_an_outlier_block(tmp_path / "m", tiny_tokenizer))
    run = Pipeline.from_spec(f"sparsity-allocation{{method=auto,target=0.6,{FAST}}}", Registry.default()).run(ir, context(ir, samples=16))
    auto = run.ir.analyses["allocation_candidates"]
    cands = {c["name"]: c for c in auto["candidates"]}
    winner = cands[auto["winner"]]
    assert auto["fidelity"] == "-kl" and auto["holdout_samples"] == 4 and auto["stats_samples"] == 12
    # 4 held-out samples are too few to screen on a part of them: every candidate sees all 4
    assert auto["screen_samples"] == 0 and all(c.get("screen_score") is None for c in cands.values())
    assert all(c["score"] is not None for c in cands.values() if not c.get("duplicate_of"))
    assert winner["name"] != "uniform" and winner["score"] > cands["uniform"]["score"]
    blocks = winner["block_sparsity"]
    assert min(blocks, key=blocks.get) == "2" and blocks["2"] < 0.6
    assert run.ir.analyses["block_outlier_ratio"][2] == max(run.ir.analyses["block_outlier_ratio"].values())
    plan = run.ir.plan
    assert plan["model.layers.2.mlp.down_proj"].target_sparsity == pytest.approx(blocks["2"])
    metrics = run.records[0].metrics
    assert metrics["winner"] == winner["name"] and metrics["achieved_mean"] == pytest.approx(0.6, abs=1e-9)
    assert metrics["auto_seconds"] > 0 and set(metrics["auto_seconds_detail"]) == {"statistics", "reference", "candidates", "total"}


def test_auto_on_minilm_is_at_least_uniform_on_held_out_data(minilm_dir):
    from compiler.trace import load_and_trace

    ir = load_and_trace(str(minilm_dir))
    dense = {n: ir.weight(n).clone() for n in ir.layers}
    ctx = context(ir, samples=8, seqlen=32)
    spec = f"sparsity-allocation{{method=auto,target=0.7,{FAST},families=owl;depth}}"
    run = Pipeline.from_spec(spec, Registry.default()).run(ir, ctx)
    auto = run.ir.analyses["allocation_candidates"]
    scores = {c["name"]: c["score"] for c in auto["candidates"]}
    # 8 grid candidates, plus 2 more λ when the winner sits at the grid's edge
    assert len(scores) == 8 + len(auto.get("grid_extended", []))
    assert "owl(lam=0.08,m=5)" in scores and "depth-down(lam=0.05)" in scores
    assert auto["fidelity"] == "cosine" and scores[auto["winner"]] >= scores["uniform"]
    assert all(torch.equal(ir.weight(n), dense[n]) for n in ir.layers)  # a decision pass: weights untouched
    assert 0.0 < scores["uniform"] < 1.0
    # the uniform score is what one-shot Wanda at 70% really gives on the held-out samples
    stats, held = split_holdout(ctx.calibration.samples, 0.25)
    names = [n for b in ir.blocks for n in b.layers]
    ref = dense_reference(ir, held)
    norms = collect_input_norms(ir, stats, names)
    for n in names:
        ir.set_weight(n, dense[n].masked_fill(row_mask(wanda_scores(dense[n], norms[n].sq_norm), 0.7), 0.0))
    assert score_candidate(ir, ref, {}) == pytest.approx(scores["uniform"], abs=1e-5)


@register_allocation
class _FrontLoaded:
    """A plugin allocation: the first block much sparser than the rest."""

    name = "front-loaded"

    def allocate(self, ir, stats, target):
        assert stats.tokens > 0 and set(stats.sq_norm) == set(stats.layers) and 5.0 in stats.block_outlier_ratio
        return {n: 0.9 if ir.layers[n].block == 0 else 0.3 for n in stats.layers}


@register_allocation
class _Broken:
    name = "broken"

    def allocate(self, ir, stats, target):
        return {stats.layers[0]: 1.5}


def test_plugin_allocations_are_candidates_scaled_to_the_target(tiny_model_dir):
    reg = Registry.default()
    reg.add("allocation", _FrontLoaded, "test")
    ir = load_ir(tiny_model_dir("llama"))
    ctx = context(ir)
    ctx.extras["registry"] = reg
    run = Pipeline.from_spec(f"sparsity-allocation{{method=auto,target=0.5,{FAST}}}", reg).run(ir, ctx)
    cand = next(c for c in run.ir.analyses["allocation_candidates"]["candidates"] if c["name"] == "plugin:front-loaded")
    assert cand["score"] is not None and cand["family"] == "plugin"
    assert cand["block_sparsity"]["0"] > cand["block_sparsity"]["1"]
    weights = [sum(ir.layers[n].params for n in b.layers) for b in ir.blocks]
    assert _wmean(list(cand["block_sparsity"].values()), weights) == pytest.approx(0.5, abs=1e-9)
    reg.add("allocation", _Broken, "test")
    with pytest.raises(PassError) as err:
        Pipeline.from_spec(f"sparsity-allocation{{method=auto,{FAST}}}", reg).run(load_ir(tiny_model_dir("llama")), ctx)
    assert isinstance(err.value.__cause__, PluginError) and "allocation 'broken'" in str(err.value)


@pytest.mark.parametrize("spec,fragment", [
    ("sparsity-allocation{method=auto,holdout=0}", "holdout must be in (0, 1)"),
    ("sparsity-allocation{method=auto,grid_lam=0.6}", "grid_lam values"),
    ("sparsity-allocation{method=auto,grid_m=0}", "grid_m"),
    ("sparsity-allocation{method=auto,families=owl;magic}", "unknown candidate family 'magic'"),
    ("sparsity-allocation{method=auto,prune_method=random}", "prune_method"),
])
def test_bad_auto_options_are_one_line_errors(spec, fragment):
    with pytest.raises(SpecError) as err:
        Pipeline.from_spec(spec, Registry.default())
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_auto_needs_calibration_data(tiny_model_dir):
    with pytest.raises(PassError, match="needs calibration data"):
        Pipeline.from_spec("sparsity-allocation{method=auto}", Registry.default()).run(load_ir(tiny_model_dir("llama")), PassContext())


def test_compile_defaults_to_auto_and_shows_the_candidates(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    r = cli("compile", tiny_model_dir("llama"), "-o", out, "--calib-samples", "4", "--calib-seqlen", "32", "--method", "magnitude")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "method=auto" in manifest["pipeline"] and "prune_method=magnitude" in manifest["pipeline"]
    assert "outlier-analysis" not in manifest["pipeline"]
    auto = manifest["analyses"]["allocation_candidates"]
    assert auto["prune_method"] == "magnitude" and auto["holdout_samples"] == 1
    assert len(auto["candidates"]) > 5 and auto["winner"] in {c["name"] for c in auto["candidates"]}
    assert (out / "plots" / "allocation.png").is_file()
    assert "## Allocation candidates" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    alloc = next(p for p in report["passes"] if p["name"] == "sparsity-allocation")
    assert alloc["metrics"]["winner"] == auto["winner"] and alloc["metrics"]["candidates"]
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    assert "allocation candidate" in r.output and "winner" in r.output and "uniform" in r.output
