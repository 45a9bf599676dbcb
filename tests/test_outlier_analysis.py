"""outlier-analysis: OWL's LOD per layer and per block from Wanda scores, on dense activations."""

import pytest
import torch
from sparsity_helpers import context, load_ir, run_spec

from compiler.block_runner import BlockRunner
from compiler.errors import NumericsError, PassError, SpecError
from compiler.pipeline import Pipeline
from compiler.registry import Registry
from passes.math.scores import outlier_ratio, pooled_outlier_ratio, wanda_scores


def test_outlier_ratio_counts_scores_above_m_times_mean():
    s = torch.tensor([1.0] * 18 + [30.0, 0.0])  # mean 2.4, threshold 5 x 2.4 = 12
    assert outlier_ratio(s, 5.0) == pytest.approx(1 / 20)
    assert outlier_ratio(s, 20.0) == 0.0


def test_pooled_ratio_equals_ratio_of_the_concatenation():
    torch.manual_seed(0)
    sets = [torch.rand(7, 5) ** 4 * 10, torch.rand(3, 11) ** 6, torch.rand(4, 4) ** 2]
    flat = torch.cat([s.flatten() for s in sets])
    assert pooled_outlier_ratio(sets, 3.0) == pytest.approx(outlier_ratio(flat, 3.0))
    # not the mean of per-set ratios: big/small sets are pooled against one mean
    assert pooled_outlier_ratio(sets, 3.0) != pytest.approx(sum(outlier_ratio(s, 3.0) for s in sets) / 3)


def test_wanda_scores_scale_columns_by_input_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    sq = torch.tensor([4.0, 9.0])
    torch.testing.assert_close(wanda_scores(w, sq), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))


def test_pass_writes_ratios_and_never_changes_weights(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    before = {k: v.clone() for k, v in ir.module.state_dict().items()}
    ctx = context(ir)
    run = Pipeline.from_spec("outlier-analysis{m=5}", Registry.default()).run(ir, ctx)
    (record,) = run.records
    assert record.modified is False
    for k, v in run.ir.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer_ratio = run.ir.analyses["outlier_ratio"]
    block_ratio = run.ir.analyses["block_outlier_ratio"]
    assert set(layer_ratio) == {n for b in ir.blocks for n in b.layers}  # lm_head (no block) not analysed
    assert set(block_ratio) == {0, 1}
    assert all(0.0 <= r < 1.0 for r in [*layer_ratio.values(), *block_ratio.values()])
    assert set(run.ir.analyses["wanda_score_stats"][ir.blocks[0].layers[0]]) >= {"mean", "std", "max"}
    # the block ratio is OWL's pooled LOD of that block's Wanda scores on dense activations
    for step in BlockRunner(ir, ctx.calibration.samples):
        stats = step.layer_stats()
        scores = [wanda_scores(ir.weight(n), stats[n].sq_norm) for n in step.block.layers]
        assert block_ratio[step.block.index] == pytest.approx(pooled_outlier_ratio(scores, 5.0))
        assert layer_ratio[step.block.layers[0]] == pytest.approx(outlier_ratio(scores[0], 5.0))


def test_a_layer_with_injected_outlier_weights_gets_a_higher_ratio(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    name = ir.blocks[1].layers[0]
    base = run_spec(ir.clone(), "outlier-analysis").ir.analyses
    w = ir.weight(name).clone()
    w[:16, :2] = 12 * w.abs().mean()  # 32 weights become outliers, the block's mean barely moves
    ir.set_weight(name, w)
    spiked = run_spec(ir, "outlier-analysis").ir.analyses
    assert spiked["outlier_ratio"][name] > base["outlier_ratio"][name] + 0.004
    assert spiked["block_outlier_ratio"][1] > base["block_outlier_ratio"][1]
    assert spiked["block_outlier_ratio"][0] == pytest.approx(base["block_outlier_ratio"][0])


@pytest.mark.parametrize("m", ["0", "-1"])
def test_non_positive_m_is_a_spec_error(m):
    with pytest.raises(SpecError, match="m must be > 0"):
        Pipeline.from_spec(f"outlier-analysis{{m={m}}}", Registry.default())


def test_nan_weight_is_reported_with_the_layer_name(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    name = ir.blocks[0].layers[2]
    w = ir.weight(name).clone()
    w[0, 0] = float("nan")
    ir.set_weight(name, w)
    with pytest.raises(PassError, match=name) as info:
        run_spec(ir, "outlier-analysis")
    assert isinstance(info.value.cause, NumericsError)
