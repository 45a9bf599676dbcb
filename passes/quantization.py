"""`quantize`: decide int8 quantization per layer (a decision pass: weights do not change).

It writes `plan[layer].quant = scheme` for the layers it selects; the decision is materialised at
lowering, per backend, in the form that backend runs fast (compiler/lowering/quant.py):
`int8-dynamic` → MatMulInteger for onnxruntime; `int8` (static, calibrated on the artifact's
calibration samples) → QDQ for onnxruntime / OpenVINO, QLinearMatMul for DeepSparse; `int4`
(weight-only, 4-bit blocks of 64, activations float, nothing calibrated) → MatMulNBits for onnxruntime
and OpenVINO (NNCF weight compression); `int8-weight` (weight-only, 8-bit blocks of 64) → 8-bit
MatMulNBits for onnxruntime (the accuracy of openvino-genai's weight-only int8: W8A8 `int8-dynamic` cost
SmolLM2 +49 % perplexity, 8-bit weights alone +0.7 %), our kernels' int8 for `sparsec`; `bf16` (weights
rounded to bfloat16, activations and sums fp32: half of fp32's bytes, no activation quantization) → the
sparsec backend's packed bf16 only (BACKEND_LOWERED: no ONNX variant); the backends without a form for a
weight-only scheme refuse it at compile.

Layers inside the model's blocks are selected by default. Layers outside them (LM heads, poolers,
classifier heads): `include_outside_blocks=auto` (the default) quantizes a causal LM's head when a check
on the calibration text says it costs at most 1 % perplexity (passes/head_check.py — the head is a
large share of the bytes per decode step, 28 M of SmolLM2's 135 M weights); under `int4` a head that fails
is checked again with 8-bit weights (`HEAD_FALLBACK`) and planned `int8-weight` when that passes — the one
mixed plan lowering accepts (MatMulNBits with 8 bits for the head, 4 for the blocks); and keeps every other
outside layer fp32 (an encoder's pooler or classifier is a negligible share of its time);
`true`/`false` force all or none. `exclude` takes regular expressions
over layer names.

Static int8 fixes each activation range from calibration data; a layer whose input has a few huge
outliers (max|x| / rms over the calibration tokens above `max_activation_ratio`) then either clips
them or spends all 256 levels on them. Those layers stay fp32 under `scheme=int8` (measured on
MiniLM: the FFN down-projections have ratio 50-86, every other layer ≤ 42; quantizing them drops the
embedding cosine vs fp32 from 0.995 to 0.943). Dynamic int8 measures the range per call and keeps
every selected layer (its static variants for OpenVINO / DeepSparse apply the same screen at lowering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult, option
from compiler.stats import STATIC_MAX_ACTIVATION_RATIO, activation_ratios
from passes.head_check import HeadCheck, check_head
from passes.plan_utils import compile_patterns, require_prunable_layers

Scheme = Literal["int8", "int8-dynamic", "int4", "int8-weight", "bf16"]
SCHEMES = ("int8", "int8-dynamic", "int4", "int8-weight", "bf16")
# a head that fails the check at the plan's scheme is checked once more at this one (llama.cpp's choice:
# a Q4 model keeps its output matrix at 6-8 bits). SmolLM2's head: int4 +14.95 % perplexity (fails),
# 8-bit weights +0.12 % (passes) — and at 8 bits it reads 28 MB per token instead of fp32's 113 MB.
HEAD_FALLBACK = {"int4": "int8-weight"}


def select_layers(ir: ModelIR, include_outside_blocks: bool, exclude: tuple[str, ...]) -> list[str]:
    """Names of the layers to quantize, in execution order."""
    patterns = compile_patterns(exclude, "quantize: exclude")
    return [n for n, layer in ir.layers.items()
            if (include_outside_blocks or layer.block is not None) and not any(p.search(n) for p in patterns)]


@dataclass(frozen=True)
class Quantize(Pass):
    """Plan int8 (static calibrated or dynamic) or int4 weight-only quantization of the prunable layers."""

    name = "quantize"
    description = "Plan int8/int4 quantization per layer (materialised per backend at lowering)"
    scheme: Scheme = option("int8", "int8: static, calibrated (QDQ / QLinearMatMul); "
                            "int8-dynamic: activations quantized at run time (MatMulInteger); "
                            "int4: weight-only 4-bit blocks (MatMulNBits; onnxruntime and openvino only); "
                            "int8-weight: weight-only 8-bit blocks (MatMulNBits; onnxruntime, sparsec); "
                            "bf16: weights rounded to bfloat16, activations fp32 (sparsec only)")
    include_outside_blocks: bool | Literal["auto"] = option(
        "auto", "also quantize layers outside the blocks (LM head, pooler, classifier): true, false, or auto "
                "(a causal LM's head when it costs <= 1% perplexity on the calibration text)")
    exclude: tuple[str, ...] = option((), "regular expressions of layer names to keep fp32")
    max_activation_ratio: float = option(STATIC_MAX_ACTIVATION_RATIO, "int8 (static): keep layers fp32 whose input max|x|/rms exceeds this (0 = off)")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return (self.scheme == "int8" and self.max_activation_ratio > 0) or self.include_outside_blocks == "auto"

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise SpecError(f"quantize: scheme must be one of {', '.join(SCHEMES)}, got '{self.scheme}'")
        compile_patterns(self.exclude, "quantize: exclude")
        if self.max_activation_ratio < 0:
            raise SpecError(f"quantize: max_activation_ratio must be >= 0, got {self.max_activation_ratio}")

    def requires(self, ir: ModelIR) -> None:
        require_prunable_layers(ir, self.name)

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        chosen = select_layers(ir, self.include_outside_blocks is True, self.exclude)
        head_checks = self._check_heads(ir, ctx) if self.include_outside_blocks == "auto" else []
        chosen += [c.layer for c in head_checks if c.passed and c.scheme == self.scheme]
        fallback = {c.layer: c.scheme for c in head_checks if c.passed and c.scheme != self.scheme}
        ratios: dict[str, float] = {}
        outliers: list[str] = []
        if self.scheme == "int8" and self.max_activation_ratio > 0 and chosen:
            ratios = activation_ratios(ir, chosen, ctx.require_calibration(self.name).samples)
            outliers = [n for n in chosen if ratios[n] > self.max_activation_ratio]
            chosen = [n for n in chosen if n not in set(outliers)]
        for name in chosen:
            ir.plan[name].quant = self.scheme
        for name, scheme in fallback.items():
            ir.plan[name].quant = scheme
        chosen += list(fallback)
        params = sum(ir.layers[n].params for n in chosen)
        total = ir.prunable_params()
        diagnostics = [] if chosen else ["no layer selected for quantization"]
        if outliers:
            diagnostics.append(f"{len(outliers)} layers stay fp32: input max|x|/rms > {self.max_activation_ratio} "
                               f"(static int8 would clip their outliers): {_names(outliers)}")
        diagnostics += [c.describe("fails at this scheme, checked at 8 bits next" if c.layer in fallback else "stays fp32")
                        for c in head_checks]
        kept = [n for n in ir.layers if n not in set(chosen)]
        if kept:
            diagnostics.append(f"{len(kept)} layers stay fp32 in total: {_names(kept)}")
        metrics: dict[str, Any] = {"scheme": self.scheme, "layers_quantized": len(chosen), "layers_fp32": len(kept),
                                   "layers_activation_outliers": len(outliers),
                                   "params_quantized_fraction": round(params / total, 4) if total else 0.0}
        if ratios:
            metrics["activation_ratio"] = {n: round(r, 2) for n, r in ratios.items()}
        if head_checks:
            metrics["head_check"] = {c.layer: c.to_dict() for c in head_checks if c.scheme == self.scheme}
            metrics["head_check_fallback"] = {c.layer: c.to_dict() for c in head_checks if c.scheme != self.scheme}
        return PassResult(ir, modified=False, metrics=metrics, diagnostics=diagnostics)

    def _check_heads(self, ir: ModelIR, ctx: PassContext) -> list[HeadCheck]:
        """`auto`: the head check for a causal LM's layers outside the blocks (none for other models)."""
        if ir.model_type != "causal-lm":
            return []
        heads = [n for n in select_layers(ir, True, self.exclude) if ir.layers[n].block is None]
        if not heads or ir.weight(heads[0]).is_meta:  # no weights in memory (streamed compile): stays fp32
            return []
        if ctx.calibration is None:  # called outside a pipeline without data: nothing to check on
            return [HeadCheck(n, self.scheme, 0, float("inf"), 0.0, float("inf"), False) for n in heads]
        samples = ctx.require_calibration(self.name).samples
        checks = [check_head(ir, n, samples, self.scheme) for n in heads]
        second = HEAD_FALLBACK.get(self.scheme)
        if second:  # a failed head gets its second chance at the fallback scheme
            checks += [check_head(ir, c.layer, samples, second) for c in checks if not c.passed]
        return checks

    def ensures(self, ir: ModelIR) -> None:
        schemes = {p.quant for p in ir.plan.values() if p.quant}
        if len(schemes) > 1 and not any(schemes == {body, head} for body, head in HEAD_FALLBACK.items()):
            raise SpecError(f"quantize: the plan mixes schemes {sorted(schemes)}; one scheme per model "
                            f"(or a weight-only body with its head fallback: {HEAD_FALLBACK})")


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit})" if len(names) > limit else "")
