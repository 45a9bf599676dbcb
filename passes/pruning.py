"""`prune`: apply the plan's per-layer targets with magnitude, Wanda or SparseGPT (weights change).

- `magnitude`: |W| compared over the whole layer; no calibration data.
- `wanda`: |W_ij|·‖X_j‖₂ compared within each output row (Sun et al. 2024).
- `sparsegpt`: OBS reconstruction with the Hessian 2/n·XXᵀ (passes/math/sparsegpt.py).

Wanda and SparseGPT run sequentially block by block (BlockRunner): a block's input statistics come
from the outputs of the *already pruned* previous blocks, as in the reference implementations.
Layers planned N:M (`nm-structure`) keep, in every group of m consecutive input columns, the n
weights with the highest score of the method. Masks are applied to the weights (stored zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from compiler.block_runner import BlockRunner, LayerStats, check_weights_finite
from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult, option
from passes.math.masks import apply_mask, layer_mask, nm_mask, nm_violations, parse_pattern, row_mask, sparsity_of
from passes.math.scores import magnitude_scores, wanda_scores
from passes.math.sparsegpt import sparsegpt_prune
from passes.plan_utils import planned_layers, require_prunable_layers

Method = Literal["magnitude", "wanda", "sparsegpt"]


@dataclass(frozen=True)
class Prune(Pass):
    """Prune every planned layer to its target (unstructured or N:M) with magnitude, Wanda or SparseGPT."""

    name = "prune"
    method: Method = option("wanda", "magnitude | wanda | sparsegpt")
    blocksize: int = option(128, "sparsegpt: columns per lazy-update block (adaptive mask granularity)")
    percdamp: float = option(0.01, "sparsegpt: Hessian dampening as a fraction of its mean diagonal")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method != "magnitude"

    def validate(self) -> None:
        if self.blocksize < 1:
            raise SpecError(f"prune: blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp > 0:
            raise SpecError(f"prune: percdamp must be > 0, got {self.percdamp}")

    def requires(self, ir: ModelIR) -> None:
        require_prunable_layers(ir, self.name)
        planned = planned_layers(ir)
        if not planned:
            raise SpecError("prune: no layer has a target sparsity: run sparsity-allocation (or nm-structure) before prune")
        outside = [n for n in planned if ir.layers[n].block is None]
        if outside and self.method != "magnitude":
            raise SpecError(f"prune: layer '{outside[0]}' is outside the model's blocks: only method=magnitude can prune it")
        for n in planned:
            nm = parse_pattern(ir.plan[n].pattern)
            if nm and ir.layers[n].in_features % nm[1]:
                raise SpecError(f"prune: layer '{n}' is planned {ir.plan[n].pattern} but in_features={ir.layers[n].in_features}")

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        planned = planned_layers(ir)
        check_weights_finite(ir, planned)
        zeros_before = {n: int((ir.weight(n) == 0).sum()) for n in planned}
        notes: list[str] = []
        sgpt: dict[str, Any] = {}
        if self.method == "magnitude":
            for k, name in enumerate(planned):
                self._prune_layer(ir, name, None, sgpt, notes)
                ctx.progress(self.name, k + 1, len(planned))
        else:
            calib = ctx.require_calibration(self.name)
            targets = set(planned)
            for step in BlockRunner(ir, calib.samples, ctx.progress, what=self.name):
                names = [n for n in step.block.layers if n in targets]
                if not names:
                    continue
                stats = step.layer_stats(hessian=self.method == "sparsegpt", layers=names)
                for name in names:  # layers with one input share one LayerStats (and Hessian): freed with `stats`
                    self._prune_layer(ir, name, stats[name], sgpt, notes)
                del stats
                step.mark_modified()
        ir.refresh_measured_sparsity()
        # honest `modified`: SparseGPT updates the kept weights of every layer it runs on; the others
        # change weights only where they zeroed some (a plan of 0% targets prunes nothing)
        modified = (self.method == "sparsegpt" and bool(planned)) or any(
            int((ir.weight(n) == 0).sum()) != zeros_before[n] for n in planned)
        return PassResult(ir, modified=modified, metrics=self._metrics(ir, planned, sgpt), diagnostics=notes + _over_pruned(ir, planned))

    def _prune_layer(self, ir: ModelIR, name: str, stats: LayerStats | None, sgpt: dict[str, Any], notes: list[str]) -> None:
        plan = ir.plan[name]
        nm = parse_pattern(plan.pattern)
        weight = ir.weight(name)
        if self.method == "sparsegpt":
            res = sparsegpt_prune(weight, stats.hessian, plan.target_sparsity, nm, self.blocksize, self.percdamp)
            sgpt[name] = res.loss
            if res.retries:
                notes.append(f"sparsegpt: layer '{name}' Hessian needed dampening {res.damp:g} x mean diag ({res.retries} retries)")
            if res.dead_columns:
                notes.append(f"sparsegpt: layer '{name}' has {res.dead_columns} input columns never active in calibration: zeroed")
            ir.set_weight(name, res.weight)
            return
        scores = magnitude_scores(weight) if self.method == "magnitude" else wanda_scores(weight, stats.sq_norm)
        if nm:
            mask = nm_mask(scores, *nm)
        elif self.method == "magnitude":
            mask = layer_mask(scores, plan.target_sparsity)
        else:
            mask = row_mask(scores, plan.target_sparsity)
        ir.set_weight(name, apply_mask(weight, mask))

    def _metrics(self, ir: ModelIR, planned: list[str], sgpt: dict[str, Any]) -> dict[str, Any]:
        params = sum(ir.plan[n].params for n in planned)
        measured = sum(ir.plan[n].measured_sparsity * ir.plan[n].params for n in planned) / params
        gap = max(abs(ir.plan[n].measured_sparsity - ir.plan[n].target_sparsity) for n in planned)
        metrics: dict[str, Any] = {"method": self.method, "layers_pruned": len(planned),
                                   "layers_nm": sum(1 for n in planned if parse_pattern(ir.plan[n].pattern)),
                                   "measured_sparsity": measured, "max_abs_target_gap": gap}
        if sgpt:
            metrics["sparsegpt_loss_total"] = sum(sgpt.values())
        return metrics

    def ensures(self, ir: ModelIR) -> None:
        for name in planned_layers(ir):
            plan = ir.plan[name]
            weight = ir.weight(name)
            nm = parse_pattern(plan.pattern)
            if nm:
                bad = nm_violations(weight, *nm)
                if bad:
                    raise SpecError(f"prune: layer '{name}' has {bad} groups with more than {nm[0]} of {nm[1]} non-zeros")
            elif sparsity_of(weight) < plan.target_sparsity - _tolerance(ir, name):
                raise SpecError(f"prune: layer '{name}' is {sparsity_of(weight):.4f} sparse, below its target {plan.target_sparsity:.4f}")


def _tolerance(ir: ModelIR, name: str) -> float:
    """Rounding slack: targets are met to the nearest weight per output row (Wanda) or finer."""
    return 1.0 / ir.layers[name].in_features + 1e-9


def _over_pruned(ir: ModelIR, planned: list[str]) -> list[str]:
    over = [n for n in planned if ir.plan[n].measured_sparsity > ir.plan[n].target_sparsity + _tolerance(ir, n)]
    if not over:
        return []
    return [f"{len(over)} layers are sparser than planned (weights that were already zero, or dead inputs): {', '.join(over[:5])}"]
