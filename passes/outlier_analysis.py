"""`outlier-analysis`: OWL's layerwise outlier distribution from calibration data; weights unchanged.

For every prunable layer inside the model's blocks, the Wanda scores |W_ij|·‖X_j‖₂ are computed from
calibration activations that flow through the *dense* model block by block (BlockRunner). Outputs:

- `ir.analyses["outlier_ratio"]` = {layer: share of the layer's scores > m × the layer's mean score}
- `ir.analyses["block_outlier_ratio"]` = {block index: the same over all prunable layers of the block
  concatenated — OWL's reference LOD, as a fraction (the reference prints percent)}
- `ir.analyses["wanda_score_stats"]` = {layer: {mean, std, max, count}}
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.block_runner import BlockRunner, check_weights_finite
from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult, option
from passes.math.scores import outlier_ratio, pooled_outlier_ratio, score_stats, wanda_scores
from passes.plan_utils import require_prunable_layers


@dataclass(frozen=True)
class OutlierAnalysis(Pass):
    """Per-layer and per-block activation-outlier ratios (OWL) from Wanda scores; never changes weights."""

    name = "outlier-analysis"
    needs_calibration = True
    m: float = option(5.0, "a Wanda score is an outlier when it exceeds m x the mean score (OWL's M)")

    def validate(self) -> None:
        if not self.m > 0:
            raise SpecError(f"outlier-analysis: m must be > 0, got {self.m}")

    def requires(self, ir: ModelIR) -> None:
        require_prunable_layers(ir, self.name)

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        calib = ctx.require_calibration(self.name)
        check_weights_finite(ir, [n for b in ir.blocks for n in b.layers])
        layer_ratio: dict[str, float] = {}
        block_ratio: dict[int, float] = {}
        stats: dict[str, dict[str, float]] = {}
        tokens = 0
        for step in BlockRunner(ir, calib.samples, ctx.progress, what=self.name):
            if not step.block.layers:
                continue
            layer_stats = step.layer_stats()
            scores = [wanda_scores(ir.weight(n), layer_stats[n].sq_norm) for n in step.block.layers]
            for name, s in zip(step.block.layers, scores):
                layer_ratio[name] = outlier_ratio(s, self.m)
                stats[name] = score_stats(s).to_dict()
            block_ratio[step.block.index] = pooled_outlier_ratio(scores, self.m)
            tokens = layer_stats[step.block.layers[0]].tokens
        ir.analyses["outlier_ratio"] = layer_ratio
        ir.analyses["block_outlier_ratio"] = block_ratio
        ir.analyses["wanda_score_stats"] = stats
        values = list(block_ratio.values())
        metrics = {"m": self.m, "blocks": len(block_ratio), "layers": len(layer_ratio), "tokens": tokens,
                   "block_outlier_ratio_min": min(values, default=0.0), "block_outlier_ratio_max": max(values, default=0.0),
                   "block_outlier_ratio": dict(block_ratio)}
        diagnostics = [] if values else ["no prunable layer inside the model's blocks: nothing analysed"]
        return PassResult(ir, modified=False, metrics=metrics, diagnostics=diagnostics)
