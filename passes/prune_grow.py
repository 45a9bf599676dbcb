"""`prune-grow`: training-free mask refinement at constant sparsity (DSnoT-style), per block.

For every pruned layer, per output row, pruned and kept weights are swapped while the swap lowers the
layer's exact reconstruction error against the dense block (passes/math/prune_grow.py; Gram matrices
from passes/paired_grams.py, the same two-stream walk as `reconstruct`). The number of non-zeros of
every row — so every layer's sparsity, and N:M groups — is unchanged; the *mask* changes by design (that
is the point of this pass), the kept weights keep their values and revived weights get their dense
value. Guard: a row whose held-out error got worse is restored. Run after `prune`; composes with
`reconstruct` (prune-grow first: reconstruct then refits the improved mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult, option
from passes.math.masks import nm_violations, parse_pattern
from passes.math.prune_grow import prune_and_grow
from passes.math.reconstruct import dense_energy, row_errors
from passes.paired_grams import LayerGrams, dense_reference, run_paired, split_samples
from passes.reconstruct import pruned_targets


@dataclass(frozen=True)
class PruneGrow(Pass):
    """Swap pruned/kept weights per row to cut reconstruction error at constant sparsity (DSnoT-style)."""

    name = "prune-grow"
    needs_calibration = True
    needs_dense = True
    cycles: int = option(50, "most swaps per output row")
    holdout: float = option(0.25, "share of calibration samples held out: rows whose held-out error rises are restored")

    def validate(self) -> None:
        if self.cycles < 1:
            raise SpecError(f"prune-grow: cycles must be >= 1, got {self.cycles}")
        if not 0.0 < self.holdout < 1.0:
            raise SpecError(f"prune-grow: holdout must be in (0, 1), got {self.holdout}")

    def requires(self, ir: ModelIR) -> None:
        pruned_targets(ir, self.name)

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        names = pruned_targets(ir, self.name)
        dense = dense_reference(ctx, self.name)
        samples = ctx.require_calibration(self.name).samples
        is_held = split_samples(len(samples), self.holdout, self.name)
        counts = {n: (ir.weight(n) != 0).sum(1) for n in names}
        per_layer: dict[str, dict[str, Any]] = {}

        def recover(group: list[LayerGrams]) -> None:
            for lg in group:
                per_layer[lg.name] = self._refine(ir, dense, lg)

        run_paired(ir, dense, samples, is_held, set(names), recover, ctx.progress, self.name)
        for n in names:
            if not torch.equal((ir.weight(n) != 0).sum(1), counts[n]):
                raise SpecError(f"prune-grow: the non-zeros per row of layer '{n}' changed (bug)")
        swaps = sum(m["swaps"] for m in per_layer.values())
        n = max(1, len(per_layer))
        metrics = {"swaps": swaps, "rows_restored": sum(m["rows_restored"] for m in per_layer.values()),
                   "mean_fit_rel_err_before": sum(m["fit_rel_err_before"] for m in per_layer.values()) / n,
                   "mean_fit_rel_err_after": sum(m["fit_rel_err_after"] for m in per_layer.values()) / n,
                   "mean_held_rel_err_before": sum(m["held_rel_err_before"] for m in per_layer.values()) / n,
                   "mean_held_rel_err_after": sum(m["held_rel_err_after"] for m in per_layer.values()) / n,
                   "per_layer": per_layer}
        return PassResult(ir, modified=swaps > 0, metrics=metrics)

    def _refine(self, ir: ModelIR, dense: ModelIR, lg: LayerGrams) -> dict[str, Any]:
        W, Wd = ir.weight(lg.name).clone(), dense.weight(lg.name)
        keep = W != 0
        nm = parse_pattern(ir.plan[lg.name].pattern)
        f, h = lg.fit, lg.held
        res = prune_and_grow(W, keep, Wd, f.ss, f.sd, self.cycles, group=nm[1] if nm else None)
        held0, held1 = row_errors(W, Wd, h.ss, h.sd, h.dd), row_errors(res.weight, Wd, h.ss, h.sd, h.dd)
        worse = held1 > held0
        new = torch.where(worse.unsqueeze(1), W, res.weight)
        if nm and nm_violations(new, *nm):
            raise SpecError(f"prune-grow: layer '{lg.name}' broke its {ir.plan[lg.name].pattern} pattern (bug)")
        ir.set_weight(lg.name, new)
        ef, eh = float(dense_energy(Wd, f.dd).sum()), float(dense_energy(Wd, h.dd).sum())
        return {"swaps": res.swaps - 0, "rows_restored": int(worse.sum()),
                "fit_rel_err_before": float(row_errors(W, Wd, f.ss, f.sd, f.dd).sum()) / max(ef, 1e-30),
                "fit_rel_err_after": float(row_errors(new, Wd, f.ss, f.sd, f.dd).sum()) / max(ef, 1e-30),
                "held_rel_err_before": float(held0.sum()) / max(eh, 1e-30),
                "held_rel_err_after": float(torch.minimum(held0, held1).sum()) / max(eh, 1e-30)}
