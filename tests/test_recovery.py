"""Recovery passes after pruning (reconstruct, prune-grow, finetune) on tiny models: masks (or per-row
non-zero counts) unchanged, sparsity unchanged, and the error against the dense model lower on data the
passes never saw."""

from __future__ import annotations

import pytest
import torch
from sparsity_helpers import load_ir

from compiler.calibration import CalibrationConfig, build_calibration
from compiler.errors import PassError, SpecError
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline
from compiler.registry import Registry
from passes.math.prune_grow import prune_and_grow
from passes.math.reconstruct import masked_least_squares, row_errors

PRUNE = "sparsity-allocation{method=uniform,target=0.6},prune{method=wanda}"


def _grams(seed=0, tokens=400, cols=32, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    xd = torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g) + 0.2 * torch.randn(tokens, cols, generator=g)
    xs = xd + shift * torch.randn(tokens, cols, generator=g)
    xs, xd = xs.double(), xd.double()
    return xs.t() @ xs, xs.t() @ xd, xd.t() @ xd


# -- math ---------------------------------------------------------------------------------------------
def test_masked_least_squares_keeps_the_mask_and_beats_the_pruned_weights():
    g = torch.Generator().manual_seed(1)
    wd = torch.randn(12, 32, generator=g)
    keep = torch.rand(12, 32, generator=g) > 0.5
    w = wd * keep
    ss, sd, dd = _grams(shift=0.1)
    new, failed = masked_least_squares(w, keep, wd, ss, sd, damp=1e-6)
    assert failed == 0
    assert torch.equal(new != 0, keep)
    assert float(row_errors(new, wd, ss, sd, dd).sum()) < 0.5 * float(row_errors(w, wd, ss, sd, dd).sum())
    # optimality: the gradient on kept coordinates vanishes
    grad = new.double() @ ss - wd.double() @ sd.t()
    assert float((grad * keep).abs().max()) < 1e-3 * float(grad.abs().max() + 1)


def test_prune_and_grow_keeps_row_counts_and_lowers_the_error():
    g = torch.Generator().manual_seed(2)
    wd = torch.randn(10, 32, generator=g)
    scores = torch.rand(10, 32, generator=g)  # a poor (random) mask to improve
    keep = scores > scores.median(dim=1, keepdim=True).values
    w = wd * keep
    ss, sd, dd = _grams(seed=3)
    res = prune_and_grow(w, keep, wd, ss, sd, max_cycles=40)
    assert res.swaps > 0
    assert torch.equal((res.weight != 0).sum(1), keep.sum(1))
    assert float(row_errors(res.weight, wd, ss, sd, dd).sum()) < float(row_errors(w, wd, ss, sd, dd).sum())


def test_prune_and_grow_respects_nm_groups():
    g = torch.Generator().manual_seed(4)
    wd = torch.randn(6, 32, generator=g)
    keep = torch.zeros(6, 32, dtype=torch.bool)
    keep[:, 0::4] = True
    keep[:, 1::4] = True  # 2:4, poorly chosen
    ss, sd, _ = _grams(seed=5)
    res = prune_and_grow(wd * keep, keep, wd, ss, sd, group=4)
    nz = (res.weight != 0).reshape(6, 8, 4).sum(2)
    assert int(nz.max()) <= 2 and res.swaps > 0


# -- passes on a tiny Llama ---------------------------------------------------------------------------
def _setup(tiny_model_dir, spec_tail: str, arch: str = "llama"):
    ir = load_ir(tiny_model_dir(arch))
    dense = ir.clone()
    # 16 samples: 4 held out (passes/reconstruct.py MIN_RELIABLE_HOLDOUT; with 2 the guard is noise)
    calib = build_calibration(ir, CalibrationConfig(samples=16, seqlen=32, seed=0))
    ctx = PassContext(calibration=calib, extras={"dense": dense})
    reg = Registry.default()
    pruned = Pipeline.from_spec(PRUNE, reg).run(ir, ctx).ir
    masks = {n: pruned.weight(n) != 0 for n in pruned.layers if pruned.plan[n].target_sparsity is not None}
    before = pruned.clone()
    run = Pipeline.from_spec(spec_tail, reg).run(pruned, ctx)
    return dense, before, run, masks


def _logit_error(dense, model, seed=7):
    """MSE of logits vs dense on windows drawn from the held-out eval corpus (never used by the passes)."""
    held = build_calibration(dense, CalibrationConfig(source="eval", samples=4, seqlen=32, seed=seed)).samples
    err = 0.0
    with torch.no_grad():
        for s in held:
            err += float((model.module(**s).logits - dense.module(**s).logits).pow(2).mean())
    return err


def test_reconstruct_masks_fixed_error_down(tiny_model_dir):
    dense, before, run, masks = _setup(tiny_model_dir, "reconstruct")
    rec = run.records[-1]
    assert rec.modified and rec.metrics["layers_refit"] > 0
    for n, m in masks.items():
        assert torch.equal(run.ir.weight(n) != 0, m), n
        assert run.ir.plan[n].measured_sparsity == before.plan[n].measured_sparsity
    assert rec.metrics["mean_held_rel_err_after"] < rec.metrics["mean_held_rel_err_before"]
    assert rec.metrics["mean_fit_rel_err_after"] < rec.metrics["mean_fit_rel_err_before"]
    assert _logit_error(dense, run.ir) < _logit_error(dense, before)


def test_prune_grow_constant_sparsity_error_down(tiny_model_dir):
    dense, before, run, masks = _setup(tiny_model_dir, "prune-grow{cycles=20}")
    rec = run.records[-1]
    for n, m in masks.items():
        assert torch.equal((run.ir.weight(n) != 0).sum(1), m.sum(1)), n
        assert run.ir.plan[n].measured_sparsity == before.plan[n].measured_sparsity
    assert rec.metrics["swaps"] > 0
    assert rec.metrics["mean_held_rel_err_after"] <= rec.metrics["mean_held_rel_err_before"]
    assert _logit_error(dense, run.ir) < _logit_error(dense, before)


def test_finetune_masks_fixed_kd_down(tiny_model_dir):
    dense, before, run, masks = _setup(tiny_model_dir, "finetune{seconds=60,steps=30,lr=0.001,eval_every=5}")
    rec = run.records[-1]
    for n, m in masks.items():
        assert torch.equal(run.ir.weight(n) != 0, m), n
    assert rec.metrics["held_kd_after"] < rec.metrics["held_kd_before"]
    assert rec.modified
    assert _logit_error(dense, run.ir) < _logit_error(dense, before)


def test_finetune_distills_an_encoders_hidden_states(tiny_model_dir):
    """Encoders: 1 − cos of the hidden states against the dense model's, masks fixed; the held-out embedding
    cosine (eval corpus, never seen by the pass) rises."""
    from passes.finetune import hidden_loss

    dense, before, run, masks = _setup(tiny_model_dir, "finetune{seconds=60,steps=30,lr=0.001,eval_every=5}", "bert")
    rec = run.records[-1]
    for n, m in masks.items():
        assert torch.equal(run.ir.weight(n) != 0, m), n
    assert rec.metrics["held_kd_after"] < rec.metrics["held_kd_before"]
    held = build_calibration(dense, CalibrationConfig(source="eval", samples=4, seqlen=32, seed=7)).samples

    def distance(model) -> float:
        with torch.no_grad():
            return sum(float(hidden_loss(model.module(**s).last_hidden_state, dense.module(**s).last_hidden_state,
                                         s.get("attention_mask"))) for s in held)

    assert distance(run.ir) < distance(before)
    t = torch.randn(2, 3, 8)
    assert float(hidden_loss(t, t, torch.ones(2, 3))) < 1e-6
    assert abs(float(hidden_loss(t, -t, None)) - 2.0) < 1e-5


def test_recovery_composes_and_round_trips(tiny_model_dir):
    spec = "prune-grow{cycles=10},reconstruct{damps=0.01}"
    dense, before, run, masks = _setup(tiny_model_dir, spec)
    assert [r.name for r in run.records] == ["prune-grow", "reconstruct"]
    p = Pipeline.from_spec(spec, Registry.default())
    assert Pipeline.from_spec(p.spec(), Registry.default()) == p
    assert _logit_error(dense, run.ir) < _logit_error(dense, before)


def test_recovery_needs_dense_model_and_pruned_layers(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    calib = build_calibration(ir, CalibrationConfig(samples=4, seqlen=32))
    reg = Registry.default()
    with pytest.raises(PassError, match="no pruned layer"):
        Pipeline.from_spec("reconstruct", reg).run(ir, PassContext(calibration=calib))
    pruned = Pipeline.from_spec(PRUNE, reg).run(ir, PassContext(calibration=calib)).ir
    with pytest.raises(PassError, match="needs the dense model"):
        Pipeline.from_spec("reconstruct", reg).run(pruned, PassContext(calibration=calib))
    with pytest.raises(SpecError, match="holdout"):
        Pipeline.from_spec("reconstruct{holdout=1.5}", reg)
    with pytest.raises(SpecError, match="seconds"):
        Pipeline.from_spec("finetune{seconds=0}", reg)


def test_cli_compile_with_recovery_passes(cli, tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "art"
    spec = PRUNE + ",prune-grow{cycles=5},reconstruct"
    res = cli("compile", tiny_model_dir("llama"), "-o", out, "--passes", spec, "--calib-samples", 8, "--calib-seqlen", 32)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]][-2:] == ["prune-grow", "reconstruct"]
    assert abs(report["sparsity"]["overall_measured"] - 0.6) < 0.02
