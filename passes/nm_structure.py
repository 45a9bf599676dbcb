"""`nm-structure`: decide an N:M pattern (n kept of every m consecutive input columns) per layer.

A decision pass: it writes `plan[layer].pattern = "n:m"` and `target_sparsity = 1 − n/m`; `prune`
(placed after it) then selects the n kept weights of each group with its method's own score.

Candidates: layers inside the model's blocks that a previous allocation left prunable (target not
None) — or, when no layer has a target yet (no allocation ran), every layer inside the blocks.
Layers whose in_features is not a multiple of m keep their plan and are listed in diagnostics.

Combined with a layerwise allocation (OWL, AlphaPruning, manual), `policy` decides:
- `all` (default): every candidate becomes N:M — what sparse tensor cores need to accelerate the
  whole model. Allocation targets that differed from 1 − n/m are replaced and reported (count,
  range) in diagnostics and metrics; nothing is overridden silently.
- `allocation`: only candidates whose allocated target is ≥ 1 − n/m become N:M; lower-target
  (outlier-heavy, under OWL) layers stay unstructured at their allocated target, and are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult, option
from passes.math.masks import nm_violations
from passes.plan_utils import planned_layers, require_prunable_layers


@dataclass(frozen=True)
class NMStructure(Pass):
    """Plan N:M semi-structured sparsity (groups along the input axis) for eligible layers."""

    name = "nm-structure"
    n: int = option(2, "weights kept per group")
    m: int = option(4, "group size along the input (reduction) axis")
    policy: Literal["all", "allocation"] = option("all", "all: every eligible layer N:M; allocation: only layers allocated >= 1-n/m")

    def validate(self) -> None:
        if self.m <= 0 or self.n <= 0:
            raise SpecError(f"nm-structure: n and m must be > 0, got n={self.n}, m={self.m}")
        if self.n >= self.m:
            raise SpecError(f"nm-structure: n must be < m (n kept of every m), got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def requires(self, ir: ModelIR) -> None:
        require_prunable_layers(ir, self.name)

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        pattern = f"{self.n}:{self.m}"
        allocated = bool(planned_layers(ir))
        candidates = [n for n, l in ir.layers.items()
                      if l.block is not None and (not allocated or ir.plan[n].target_sparsity is not None)]
        applied, misfit, kept_lower, replaced = [], [], [], []
        for name in candidates:
            plan = ir.plan[name]
            if ir.layers[name].in_features % self.m:
                misfit.append(name)
                continue
            previous = plan.target_sparsity
            if self.policy == "allocation" and previous is not None and previous < self.sparsity - 1e-9:
                kept_lower.append(name)
                continue
            if previous is not None and abs(previous - self.sparsity) > 1e-9 and plan.pattern != pattern:
                replaced.append(previous)
            plan.pattern = pattern
            plan.target_sparsity = self.sparsity
            applied.append(name)
        diagnostics = []
        if misfit:
            diagnostics.append(f"{len(misfit)} layers keep their plan: in_features not a multiple of {self.m}: {', '.join(misfit)}")
        if kept_lower:
            diagnostics.append(f"policy=allocation: {len(kept_lower)} layers allocated below {self.sparsity:.3f} stay unstructured")
        if replaced:
            diagnostics.append(f"{len(replaced)} allocated targets in [{min(replaced):.3f}, {max(replaced):.3f}] replaced by {pattern} "
                               f"({self.sparsity:.3f}); use policy=allocation to keep lower ones unstructured")
        already = [n for n in applied if ir.plan[n].measured_sparsity > 0 and nm_violations(ir.weight(n), self.n, self.m)]
        if already:
            diagnostics.append(f"{len(already)} layers are already pruned without {pattern} structure: run prune after nm-structure")
        if not applied:
            diagnostics.append(f"no layer can take {pattern}")
        metrics = {"pattern": pattern, "policy": self.policy, "layers_nm": len(applied), "layers_misfit": len(misfit),
                   "layers_kept_unstructured": len(kept_lower), "targets_replaced": len(replaced)}
        return PassResult(ir, modified=False, metrics=metrics, diagnostics=diagnostics)

    def ensures(self, ir: ModelIR) -> None:
        pattern = f"{self.n}:{self.m}"
        for name, plan in ir.plan.items():
            if plan.pattern == pattern and ir.layers[name].in_features % self.m:
                raise SpecError(f"nm-structure: layer '{name}' planned {pattern} but in_features is not a multiple of {self.m}")
