"""`sparsity-allocation`: decide each layer's target sparsity (a decision pass: plan only, no weights).

Methods:
- `uniform`: every allocated layer gets `target`.
- `owl` (needs `outlier-analysis` first): OWL's reference formula per block (`granularity=block`) or
  per layer; more outliers ⇒ lower sparsity, spread 2·lam, parameter-weighted mean exactly `target`.
- `alphapruning`: the power-law alpha of each weight's ESD (no calibration data), averaged per block
  (or per layer); higher alpha ⇒ higher sparsity, spread 2·lam (AlphaPruning's ε), weighted mean `target`.
- `auto`: scores candidate allocations (uniform, OWL over a λ × m grid, AlphaPruning, depth ramps,
  plugin allocations) on held-out calibration samples with the masks of `prune_method`, and keeps the
  one with the best fidelity to the dense model (passes/allocation_auto.py, docs/auto-allocation.md).
- `manual`: a YAML mapping `{layer name or regex: ratio}` from `file`. Exact names win over regexes
  (full match, first matching regex in file order); a ratio `null` keeps the layer dense; layers
  matched by no entry get `target`; an entry matching no layer is an error.

Which layers are allocated: those inside the model's blocks, not matching a `dense` regex
(re.search), and not already given an N:M pattern by `nm-structure` (those keep their N:M target;
the mean is kept over the others and the overall mean is reported). Layers outside the blocks
(heads, poolers) and `dense` matches get target None and stay dense.

Bounds: ratios are clamped to [0, max(0.99, target)] and re-distributed so the weighted mean stays
exactly `target` (see passes/math/owl.py); the number of clamped groups is reported in metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult, option
from compiler.spec import DEFAULT_SPARSITY, load_yaml_file
from passes.math.alpha import layer_alpha
from passes.math.masks import parse_pattern
from passes.math.owl import Allocation, alpha_allocation, owl_allocation
from passes.plan_utils import compile_patterns, layer_groups, require_prunable_layers, weighted_mean_target

Method = Literal["uniform", "owl", "alphapruning", "manual", "auto"]
DEFAULT_DENSE = ("embed", "lm_head", "wte", "wpe", "shared")


@dataclass(frozen=True)
class SparsityAllocation(Pass):
    """Per-layer target sparsity: uniform, OWL (outlier-weighted), AlphaPruning (ESD alpha) or manual YAML."""

    name = "sparsity-allocation"
    method: Method = option("owl", "uniform | owl | alphapruning | manual | auto")
    target: float = option(DEFAULT_SPARSITY, "mean target sparsity over allocated parameters, in [0, 1)")
    lam: float = option(0.08, "half-width of the allocation spread (OWL lambda / AlphaPruning epsilon)")
    granularity: Literal["block", "layer"] = option("block", "one ratio per block (reference) or per layer")
    file: str = option("", "manual: YAML mapping {layer name or regex: ratio or null}")
    dense: tuple[str, ...] = option(DEFAULT_DENSE, "regexes (re.search) of layers never pruned")
    prune_method: Literal["magnitude", "wanda", "sparsegpt"] = option(
        "wanda", "auto: pruning method whose masks score the candidates (sparsegpt: Wanda proxy)")
    holdout: float = option(0.25, "auto: share of calibration samples held out to score candidates")
    grid_lam: tuple[float, ...] = option((0.05, 0.1, 0.15), "auto: spreads (λ) tried by every candidate family")
    grid_m: tuple[float, ...] = option((5.0, 10.0), "auto: OWL outlier thresholds (m) tried")
    families: tuple[str, ...] = option(("owl", "alphapruning", "depth"), "auto: candidate families besides uniform and plugins")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method == "auto"

    def validate(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise SpecError(f"sparsity-allocation: target must be in [0, 1), got {self.target}")
        if not 0.0 <= self.lam < 1.0:
            raise SpecError(f"sparsity-allocation: lam must be in [0, 1), got {self.lam}")
        if self.method == "manual" and not self.file:
            raise SpecError("sparsity-allocation: method=manual needs file=PATH.yaml")
        if self.file and self.method != "manual":
            raise SpecError(f"sparsity-allocation: file is only read by method=manual (method is {self.method})")
        compile_patterns(self.dense, "sparsity-allocation dense")
        if self.method == "auto":
            from passes.allocation_auto import validate_settings

            validate_settings(self._auto_settings())

    def requires(self, ir: ModelIR) -> None:
        require_prunable_layers(ir, self.name)
        if self.method == "owl":
            key = "block_outlier_ratio" if self.granularity == "block" else "outlier_ratio"
            if key not in ir.analyses:
                raise SpecError("sparsity-allocation method=owl needs outlier ratios: run outlier-analysis first")

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        dense_res = compile_patterns(self.dense, "sparsity-allocation dense")
        allocated, fixed_nm, dense = [], [], []
        for name, layer in ir.layers.items():
            plan = ir.plan[name]
            if layer.block is None or any(r.search(name) for r in dense_res):
                dense.append(name)
            elif parse_pattern(plan.pattern):
                fixed_nm.append(name)
            else:
                allocated.append(name)
        if not allocated and not fixed_nm:
            raise SpecError(f"sparsity-allocation: every prunable layer is dense (outside the blocks or matching dense={';'.join(self.dense)})")
        metrics: dict[str, Any] = {"method": self.method, "target": self.target, "granularity": self.granularity}
        diagnostics: list[str] = []
        for name in dense:
            ir.plan[name].target_sparsity = None
            ir.plan[name].pattern = None
        if allocated:
            ratios, info = self._ratios(ir, allocated, diagnostics, ctx)
            metrics.update(info)
            for name in allocated:
                ir.plan[name].target_sparsity = ratios[name]
                ir.plan[name].pattern = None if ratios[name] is None else "unstructured"
        if fixed_nm:
            diagnostics.append(f"{len(fixed_nm)} layers keep their N:M pattern and target from nm-structure")
        pruned = [n for n in ir.layers if ir.plan[n].target_sparsity is not None]
        values = [ir.plan[n].target_sparsity for n in pruned]
        mean_alloc = weighted_mean_target(ir, [n for n in allocated if ir.plan[n].target_sparsity is not None])
        metrics.update({
            "layers_allocated": len(allocated), "layers_nm": len(fixed_nm), "layers_dense": len(dense),
            "achieved_mean": mean_alloc, "achieved_mean_all": weighted_mean_target(ir, pruned),
            "min": min(values, default=None), "max": max(values, default=None),
            "allocation": {n: ir.plan[n].target_sparsity for n in allocated},
        })
        return PassResult(ir, modified=False, metrics=metrics, diagnostics=diagnostics)

    def ensures(self, ir: ModelIR) -> None:
        for name, plan in ir.plan.items():
            t = plan.target_sparsity
            if t is not None and not 0.0 <= t < 1.0:
                raise SpecError(f"sparsity-allocation produced target {t} for layer '{name}' outside [0, 1)")

    # -- per-method ratios ------------------------------------------------------------------------
    def _auto_settings(self) -> Any:
        from passes.allocation_auto import AutoSettings

        return AutoSettings(self.target, self.granularity, self.prune_method, self.holdout, self.grid_lam, self.grid_m, self.families)

    def _ratios(self, ir: ModelIR, names: list[str], diagnostics: list[str],
                ctx: PassContext | None = None) -> tuple[dict[str, float | None], dict[str, Any]]:
        if self.method == "auto":
            from passes.allocation_auto import auto_allocation

            return auto_allocation(self._auto_settings(), ir, names, ctx or PassContext(), diagnostics)
        if self.method == "manual":
            return _manual_ratios(ir, names, Path(self.file), self.target, diagnostics), {"file": self.file}
        if self.method == "uniform":
            return {n: self.target for n in names}, {}
        groups = layer_groups(ir, names, self.granularity)
        keys = list(groups)
        weights = [float(sum(ir.layers[n].params for n in groups[k])) for k in keys]
        info: dict[str, Any] = {}
        if self.method == "owl":
            if self.granularity == "block":
                source = ir.analyses["block_outlier_ratio"]
                scores = [float(source.get(k, source.get(str(k), 0.0))) for k in keys]
            else:
                scores = [float(ir.analyses["outlier_ratio"].get(k, 0.0)) for k in keys]
            alloc = owl_allocation(scores, self.target, self.lam, weights)
            info["outlier_ratio"] = dict(zip(map(str, keys), scores))
        else:
            alphas = {n: layer_alpha(ir.weight(n)) for n in names}
            scores = [sum(alphas[n] for n in groups[k]) / len(groups[k]) for k in keys]
            alloc = alpha_allocation(scores, self.target, self.lam, weights)
            ir.analyses["esd_alpha"] = alphas
            info["alpha"] = dict(zip(map(str, keys), scores))
        _report_clamping(alloc, diagnostics)
        info["clamped_groups"] = alloc.clamped
        info["group_sparsity"] = dict(zip(map(str, keys), alloc.sparsities))
        ratios = {n: s for k, s in zip(keys, alloc.sparsities) for n in groups[k]}
        return ratios, info


def _report_clamping(alloc: Allocation, diagnostics: list[str]) -> None:
    if alloc.clamped:
        diagnostics.append(f"{alloc.clamped} groups clamped to [0, {max(alloc.sparsities):.3f}]; "
                           f"the others were shifted to keep the weighted mean at {alloc.mean:.4f}")


def _manual_ratios(ir: ModelIR, names: list[str], path: Path, default: float, diagnostics: list[str]) -> dict[str, float | None]:
    data = load_yaml_file(path, "sparsity-allocation: manual file")
    if not isinstance(data, dict) or not data:
        raise SpecError(f"sparsity-allocation: manual file '{path}' must be a mapping {{layer or regex: ratio}}")
    entries: dict[str, float | None] = {}
    for key, value in data.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
            raise SpecError(f"sparsity-allocation: manual ratio for '{key}' must be a number in [0, 1) or null, got {value!r}")
        entries[str(key)] = None if value is None else float(value)
    patterns = dict(zip(entries, compile_patterns(tuple(entries), f"manual file '{path}'")))

    def match(layer: str) -> str | None:
        if layer in entries:
            return layer
        return next((k for k, rx in patterns.items() if rx.fullmatch(layer)), None)

    ratios: dict[str, float | None] = {}
    used: set[str] = set()
    for n in names:
        key = match(n)
        ratios[n] = default if key is None else entries[key]
        if key is not None:
            used.add(key)
    defaulted = [n for n in names if match(n) is None]
    if defaulted:
        diagnostics.append(f"{len(defaulted)} layers not named in '{path}' got the default target {default}")
    for key in entries:
        if key in used:
            continue
        if any(key == n or patterns[key].fullmatch(n) for n in ir.layers):
            diagnostics.append(f"manual entry '{key}' only matches dense layers (outside blocks, dense= or N:M): ignored")
        else:
            raise SpecError(f"sparsity-allocation: manual entry '{key}' matches no prunable layer")
    return ratios
