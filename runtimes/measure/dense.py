"""The dense reference: the *source* model lowered exactly like the artifact, cached outside it, for
verification and benchmarks to compare against (dense fp32, the dense model in the compiled plan's int8
form, and the dense alternatives the backends declare).

`dense_reference(manifest, options, backends, registry)` lowers the source model (manifest
`source.resolved`) into a cache directory (`$SPARSEC_CACHE_DIR` or ~/.cache/sparsec, keyed by the source
weights' sha256); the compile driver fills that cache from the dense IR it already holds
(`cache_dense_reference`), so verification right after compile reloads nothing. `model_configs` names
the files one backend times: label → path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.artifact import write_json
from compiler.calibration import CalibrationConfig, build_calibration
from compiler.errors import SparsecError
from compiler.ir import ModelIR, state_dict_sha256
from compiler.lowering.files import MODEL_FILE, model_file
from compiler.lowering.lower import LOWERING_FORMAT, lower_model
from compiler.lowering.quant import MIXED_WEIGHT_ONLY, QUANT_FORMAT, variants_for_scheme, write_variants

SOURCE_MODEL_DIR = "model"
COMPILED = "compiled"
DENSE = "dense fp32"


def cache_root(options: dict[str, Any] | None = None) -> Path:
    configured = (options or {}).get("cache_dir") or os.environ.get("SPARSEC_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "sparsec"


def dense_dir(source_sha256: str, options: dict[str, Any] | None = None) -> Path:
    return cache_root(options) / "dense" / f"{source_sha256[:20]}-v{LOWERING_FORMAT}"


def cache_dense_reference(dense_ir: ModelIR, source_sha256: str, options: dict[str, Any] | None,
                          calib: Any = None, quants: list[DenseQuant] = (), keep_model: bool = False) -> Path:
    """Lower the dense model into the cache (once per source hash); returns the cache directory.
    Each entry of `quants` (which layers are int8, in which variants) also gets the dense model's
    int8 variants, under `quant_root(...)`."""
    target = dense_dir(source_sha256, options)
    if not (target / MODEL_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dense-", dir=target.parent))
        try:
            _, section = lower_model(dense_ir, tmp / MODEL_FILE)
            write_json(tmp / "lowering.json", section)
            try:
                os.rename(tmp, target)
            except OSError:  # another process filled the cache first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_model and not (target / SOURCE_MODEL_DIR / "config.json").is_file():
        _save_source_model(dense_ir, target / SOURCE_MODEL_DIR)
    for dq in quants:
        missing = _missing_variants(target, dq)
        if missing:
            section = json.loads((target / "lowering.json").read_text(encoding="utf-8"))
            write_variants(_with_quant_plan(dense_ir, dq.quant), target / MODEL_FILE, quant_root(target, dq.quant),
                           section, dq.scheme, calib, {v: () for v in missing})
    return target


def needs_source_model(backends: tuple[str, ...] | list[str], registry: Any) -> bool:
    """Whether a backend among `backends` runs the Hugging Face model rather than a graph."""
    return any(getattr(registry.get_backend(b), "needs_source_model", False) for b in backends)


def _save_source_model(dense_ir: ModelIR, directory: Path) -> None:
    """The dense source model's Hugging Face directory, written atomically (for model-running backends)."""
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=directory.parent))
    try:
        dense_ir.module.save_pretrained(tmp, safe_serialization=True)
        if dense_ir.tokenizer is not None:
            dense_ir.tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process saved it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quant_root(target: Path, quant: dict[str, str]) -> Path:
    """Where the dense reference's int8 variants for one set of quantized layers live in the cache."""
    key = hashlib.sha256(json.dumps([QUANT_FORMAT, sorted(quant.items())]).encode()).hexdigest()[:12]
    return target / f"quant-{key}"


@dataclass(frozen=True)
class DenseQuant:
    """A dense int8 reference: which layers are quantized in which scheme, and the variants needed."""

    quant: dict[str, str]
    variants: tuple[str, ...]
    role: str  # "same-plan" (the compiled plan's quantization) | "alternative" (a backend's `dense_alternatives`)

    @property
    def scheme(self) -> str:
        schemes = frozenset(self.quant.values())
        return MIXED_WEIGHT_ONLY.get(schemes) or next(iter(schemes))


def dense_variant_files(target: Path, dq: DenseQuant) -> dict[str, Path]:
    """Variant name → dense ONNX file in the cache."""
    root = quant_root(target, dq.quant)
    return {v: root / "onnx" / v / "model.onnx" for v in dq.variants}


def _missing_variants(target: Path, dq: DenseQuant) -> tuple[str, ...]:
    return tuple(v for v, p in dense_variant_files(target, dq).items() if not p.is_file())


def _with_quant_plan(dense_ir: ModelIR, quant: dict[str, str]) -> ModelIR:
    """The dense model with the given quantization decisions (a shallow copy: the caller's plan is
    untouched)."""
    plan = {n: copy.copy(p) for n, p in dense_ir.plan.items()}
    for name, p in plan.items():
        p.quant = quant.get(name)
    new = copy.copy(dense_ir)
    new.plan = plan
    return new


def plan_quant(plan: dict[str, Any]) -> dict[str, str]:
    """{layer: scheme} from a plan (ModelIR.plan objects or manifest dicts)."""
    out = {}
    for name, p in plan.items():
        q = p.get("quant") if isinstance(p, dict) else getattr(p, "quant", None)
        if q:
            out[name] = q
    return out


def block_layers_quant(plan: dict[str, Any], scheme: str) -> dict[str, str]:
    """{layer: scheme} for every layer inside the blocks: the dense int8 alternative's layers."""
    return {n: scheme for n, p in plan.items() if (p.get("block") if isinstance(p, dict) else p.block) is not None}


def reference_quants(plan: dict[str, Any], backends: tuple[str, ...] | list[str], registry: Any) -> list[DenseQuant]:
    """Which dense int8 references verification needs: the compiled plan's own quantization (same
    layers, same scheme, every variant), and the dense alternatives the requested backends declare
    (`Backend.dense_alternatives`, variant → scheme on every block layer; onnxruntime: int8-dynamic, DESIGN §5)."""
    quants = []
    own = plan_quant(plan)
    if own:
        scheme = next(iter(set(own.values())))
        quants.append(DenseQuant(own, tuple(variants_for_scheme(scheme, tuple(backends), registry)), "same-plan"))
    by_scheme: dict[str, list[str]] = {}
    for name in backends:
        for variant, scheme in registry.get_backend(name).dense_alternatives.items():
            by_scheme.setdefault(scheme, [])
            if variant not in by_scheme[scheme]:
                by_scheme[scheme].append(variant)
    for scheme, variants in by_scheme.items():
        alt = block_layers_quant(plan, scheme)
        if alt and alt != own:
            quants.append(DenseQuant(alt, tuple(variants), "alternative"))
    return quants


def dense_reference(manifest: dict[str, Any], options: dict[str, Any] | None, backends: tuple[str, ...] | list[str],
                    registry: Any) -> Path:
    """The cache directory holding the dense source model lowered like the artifact (`onnx/model.onnx`,
    plus the dense int8 variants of `reference_quants`); lowered from `source.resolved` when not
    cached yet."""
    source = manifest.get("source", {})
    sha = source.get("sha256")
    if not sha:
        raise SparsecError("the artifact's manifest has no source sha256: cannot find its dense reference")
    target = dense_dir(sha, options)
    quants = reference_quants(manifest.get("plan", {}), backends, registry)
    keep_model = needs_source_model(backends, registry)
    if (target / MODEL_FILE).is_file() and not any(_missing_variants(target, q) for q in quants) and \
            (not keep_model or (target / SOURCE_MODEL_DIR / "config.json").is_file()):
        return target
    from compiler.trace import load_and_trace

    dense_ir = load_and_trace(source.get("resolved") or source.get("model"), tokenizer=source.get("tokenizer"))
    actual = state_dict_sha256(dense_ir.module)
    if actual != sha:
        raise SparsecError(f"the source model '{source.get('resolved')}' changed since compile (sha256 {actual[:12]} "
                           f"!= {sha[:12]} in the manifest): cannot build its dense reference")
    calib = _rebuild_calibration(dense_ir, manifest) if any(q.role == "same-plan" for q in quants) else None
    return cache_dense_reference(dense_ir, sha, options, calib, quants, keep_model)


def _rebuild_calibration(ir: ModelIR, manifest: dict[str, Any]) -> Any:
    """The artifact's calibration samples again, from the settings in its manifest (same sha256)."""
    cal = manifest.get("calibration") or {}
    cfg = CalibrationConfig(source=cal.get("source", "default"), samples=int(cal.get("samples", 32)),
                            seqlen=int(cal.get("seqlen", 128)), seed=int(cal.get("seed", 0)))
    if cfg.source == "example_inputs":
        cfg = CalibrationConfig(samples=cfg.samples, seqlen=cfg.seqlen, seed=cfg.seed)
    return build_calibration(ir, cfg)


def model_configs(root: Path, manifest: dict[str, Any], backend: Any, dense_root: Path,
                  backends: tuple[str, ...], registry: Any) -> dict[str, Path]:
    """Label → ONNX file for one backend: the compiled model, dense fp32, and dense int8 forms (the
    plan's own variant, and the dense alternatives this backend declares)."""
    lowering = manifest["lowering"]
    compiled_rel = model_file(lowering, backend.name)
    configs = {COMPILED: root / compiled_rel, DENSE: dense_root / MODEL_FILE}
    variant = next((name for name, v in lowering.get("variants", {}).items() if v["file"] == compiled_rel), None)
    for dq in reference_quants(manifest.get("plan", {}), backends, registry):
        files = dense_variant_files(dense_root, dq)
        if dq.role == "same-plan" and variant in files:
            configs[f"dense {variant}"] = files[variant]
        elif dq.role == "alternative":
            for alt in backend.dense_alternatives:
                if alt in files:
                    configs[f"dense {alt}"] = files[alt]
    configs.update(backend.dense_configs(dense_root, manifest))
    return configs
