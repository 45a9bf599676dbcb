"""prune: masks, Wanda vs magnitude, SparseGPT reconstruction, sequential calibration, targets met."""

import pytest
import torch
from sparsity_helpers import block_layers, context, load_ir, run_spec

from compiler.block_runner import BlockRunner
from compiler.errors import NumericsError, PassError, SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline
from compiler.registry import Registry
from passes.math.masks import layer_mask, nm_mask, row_mask
from passes.math.scores import magnitude_scores, wanda_scores
from passes.math.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from passes.pruning import Prune


def _calib(tokens=512, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols // 4, generator=g)
    return z @ torch.randn(cols // 4, cols, generator=g) + 0.1 * torch.randn(tokens, cols, generator=g)  # correlated inputs


def _hessian(x):
    return 2.0 / x.shape[0] * x.t() @ x


# -- masks --------------------------------------------------------------------------------------------
def test_row_mask_prunes_the_same_count_in_every_row():
    scores = torch.rand(8, 10, generator=torch.Generator().manual_seed(0))
    mask = row_mask(scores, 0.3)
    assert mask.sum(1).tolist() == [3] * 8
    assert torch.all(scores[mask].max() >= 0) and all(scores[r][mask[r]].max() <= scores[r][~mask[r]].min() for r in range(8))


def test_layer_mask_compares_the_whole_matrix():
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.6]])
    assert layer_mask(scores, 0.5).tolist() == [[True, False], [False, False], [True, True]]


def test_nm_mask_keeps_n_per_group_along_the_input_axis():
    scores = torch.arange(16.0).reshape(2, 8).flip(1)
    mask = nm_mask(scores, 2, 4)
    assert (~mask).reshape(2, 2, 4).sum(2).tolist() == [[2, 2], [2, 2]]
    assert mask[0].tolist() == [False, False, True, True, False, False, True, True]


# -- Wanda vs magnitude ------------------------------------------------------------------------------
def test_wanda_keeps_a_small_weight_column_with_a_high_norm_input_magnitude_does_not():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g).sign() * (1 + torch.rand(16, 32, generator=g))
    w[:, 5] = 0.05  # small weights ...
    sq_norm = torch.ones(32)
    sq_norm[5] = 1e6  # ... fed by a huge activation channel
    wanda = row_mask(wanda_scores(w, sq_norm), 0.5)
    magnitude = layer_mask(magnitude_scores(w), 0.5)
    assert not wanda[:, 5].any()
    assert magnitude[:, 5].all()


# -- SparseGPT -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_at_equal_sparsity(nm):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    x = _calib()
    h = _hessian(x)
    res = sparsegpt_prune(w, h, 0.5, nm, blocksize=32)
    scores = wanda_scores(w, (x * x).sum(0))
    wanda = w.masked_fill(nm_mask(scores, *nm) if nm else row_mask(scores, 0.5), 0.0)
    assert float((res.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    err_sgpt = torch.linalg.norm(x @ w.t() - x @ res.weight.t())
    err_wanda = torch.linalg.norm(x @ w.t() - x @ wanda.t())
    assert err_sgpt < 0.8 * err_wanda
    if nm:
        assert ((res.weight.reshape(48, 16, 4) != 0).sum(2) <= 2).all()


def _column_loop_sparsegpt(w, h, sparsity, blocksize):
    """The reference's unstructured `fasterprune` column loop, as sparsec ran it before the block solve."""
    from passes.math.masks import prune_count

    W = w.clone()
    Hinv, _, _ = inverse_hessian_factor(h.clone(), 0.01)
    rows, cols = W.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        score = W1.square() / torch.diag(Hinv1).unsqueeze(0).square()
        mask1 = torch.zeros(W1.numel(), dtype=torch.bool)
        mask1[torch.topk(score.flatten(), prune_count(W1.numel(), sparsity), largest=False).indices] = True
        mask1 = mask1.view_as(W1)
        for i in range(i2 - i1):
            q = W1[:, i].clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 32), (0.7, 128), (0.6, 24)])
def test_sparsegpt_lean_loop_equals_the_reference_loop(sparsity, blocksize):
    """The unstructured block's lean column loop (passes/math/sparsegpt.py: mask by kthvalue, one rank-1
    update per column) gives the masks and weights of the reference's column-by-column loop."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 96, generator=g)
    h = _hessian(_calib(tokens=400, cols=96))
    res = sparsegpt_prune(w, h, sparsity, blocksize=blocksize)
    ref = _column_loop_sparsegpt(w, h, sparsity, blocksize)
    assert torch.equal(res.weight == 0, ref == 0)
    torch.testing.assert_close(res.weight, ref, atol=1e-4, rtol=1e-4)


def test_sparsegpt_zeroes_dead_columns_and_keeps_exact_sparsity():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    x = _calib(tokens=64, cols=16)
    x[:, 3] = 0.0
    res = sparsegpt_prune(w, _hessian(x), 0.5, blocksize=8)
    assert res.dead_columns == 1 and (res.weight[:, 3] == 0).all()
    assert int((res.weight == 0).sum()) == 64


def test_cholesky_failure_raises_dampening_and_reports_it():
    h = torch.eye(8)
    h[0, 0] = -0.5  # indefinite: 1% and 10% dampening are not enough, 100% is
    _, damp, retries = inverse_hessian_factor(h, 0.01)
    assert retries == 2 and damp == pytest.approx(1.0)


# -- the pass -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_meets_every_layer_target(tiny_model_dir, method):
    ir = load_ir(tiny_model_dir("opt"))
    head = ir.weight("lm_head").clone()
    run = run_spec(ir, f"outlier-analysis,sparsity-allocation{{target=0.6}},prune{{method={method}}}")
    for name in block_layers(ir):
        plan = ir.plan[name]
        measured = float((ir.weight(name) == 0).float().mean())
        assert plan.measured_sparsity == pytest.approx(measured)
        assert abs(measured - plan.target_sparsity) <= 0.5 / ir.layers[name].in_features + 1e-9, name
        if method == "wanda":  # compared within each output row
            per_row = (ir.weight(name) == 0).sum(1)
            assert per_row.min() == per_row.max()
    assert torch.equal(ir.weight("lm_head"), head)  # outside the blocks: dense
    rec = run.records[-1]
    assert rec.modified and rec.metrics["measured_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert "outlier_ratio" in run.analyses  # kept for the manifest, although invalidated in the IR
    assert "outlier_ratio" not in ir.analyses


def test_magnitude_needs_no_calibration(tiny_model_dir):
    ir = run_spec(load_ir(tiny_model_dir("llama")), "sparsity-allocation{method=uniform,target=0.5},prune{method=magnitude}",
                  calibrate=False).ir
    assert ir.plan["model.layers.1.mlp.up_proj"].measured_sparsity == pytest.approx(0.5)
    assert Prune(method="magnitude").needs_calibration is False and Prune().needs_calibration is True


def test_wanda_feeds_pruned_block_outputs_forward(tiny_model_dir):
    """Block 1 is pruned with input norms measured *after* block 0 was pruned (the reference order)."""
    ir = load_ir(tiny_model_dir("llama"))
    ctx = context(ir)
    expected = ir.clone()
    run_spec(expected, "sparsity-allocation{method=uniform,target=0.5}", calibrate=False)
    for step in BlockRunner(expected, ctx.calibration.samples):
        stats = step.layer_stats()
        for n in step.block.layers:
            w = expected.weight(n)
            expected.set_weight(n, w.masked_fill(row_mask(wanda_scores(w, stats[n].sq_norm), 0.5), 0.0))
        step.mark_modified()
    got = Pipeline.from_spec("sparsity-allocation{method=uniform,target=0.5},prune{method=wanda}", Registry.default()).run(ir, ctx).ir
    for n in block_layers(ir):
        assert torch.equal(got.weight(n) == 0, expected.weight(n) == 0), n
    # and that differs from using dense activations for block 1
    dense = load_ir(tiny_model_dir("llama"))
    for step in BlockRunner(dense, ctx.calibration.samples):
        stats = step.layer_stats()
        if step.block.index == 1:
            n = step.block.layers[0]
            assert not torch.equal(row_mask(wanda_scores(dense.weight(n), stats[n].sq_norm), 0.5), got.weight(n) == 0)


def test_nan_weight_names_the_layer(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    name = "model.layers.1.mlp.gate_proj"
    w = ir.weight(name).clone()
    w[3, 3] = float("inf")
    ir.set_weight(name, w)
    with pytest.raises(PassError, match=name) as info:
        run_spec(ir, "sparsity-allocation{method=uniform},prune", calibrate=False)
    assert isinstance(info.value.cause, NumericsError)


def test_prune_without_targets_or_layers_is_a_clear_spec_error(tiny_model_dir):
    with pytest.raises(PassError, match="run sparsity-allocation"):
        run_spec(load_ir(tiny_model_dir("llama")), "prune", calibrate=False)
    empty = ModelIR(module=torch.nn.Identity(), blocks=[], layers={}, source="identity", model_type="module")
    with pytest.raises(SpecError, match="no prunable layers"):
        Prune()(empty, PassContext())


@pytest.mark.parametrize("spec", ["prune{blocksize=0}", "prune{percdamp=0}", "prune{method=obs}"])
def test_invalid_prune_options(spec):
    with pytest.raises(SpecError):
        Pipeline.from_spec(spec, Registry.default())
