"""`compile_model`: load + trace, run the pipeline, write the artifact, then (optionally) evaluate,
lower and verify on backends. The CLI is a thin shell over this function."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compiler import __version__
from compiler.artifact import REPORT_JSON, REPORT_MD, ArtifactWriter, write_json
from compiler.calibration import CalibrationConfig, CalibrationSet, build_calibration
from compiler.errors import SpecError
from compiler.instruments import DumpIRInstrument, TimingInstrument
from compiler.ir import ModelIR, jsonable, state_dict_sha256
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline, PipelineRun, Recipe
from compiler.registry import Registry
from compiler.report import build_report, plot_plan, render_markdown
from compiler.spec import DEFAULT_SPARSITY
from compiler.streaming.streamed_ir import is_streamed
from compiler.trace import DEFAULT_MODEL

DEFAULT_ALLOCATION = "auto"  # scores uniform/OWL/AlphaPruning/... on held-out calibration data
DEFAULT_METHOD = "wanda"


def shorthand_spec(sparsity: float | None = None, allocation: str | None = None, method: str | None = None,
                   pattern: str | None = None, quantize: str | None = None, recover: str | None = None) -> str:
    """The default pipeline with `--sparsity/--allocation/--method/--pattern/--quantize/--recover` applied
    (`recover`: comma-separated recovery passes run after prune, e.g. "prune-grow,reconstruct")."""
    sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
    structured = bool(pattern) and pattern != "unstructured"
    # nm-structure replaces every allocated target with 1 - n/m, so a search would be thrown away
    allocation = allocation or ("uniform" if structured else DEFAULT_ALLOCATION)
    method = method or DEFAULT_METHOD
    parts = []
    if allocation == "owl":  # auto computes its own outlier statistics
        parts.append("outlier-analysis")
    extra = f",prune_method={method}" if allocation == "auto" else ""
    parts.append(f"sparsity-allocation{{method={allocation},target={sparsity!r}{extra}}}")
    if structured:
        n, sep, m = pattern.partition(":")
        if not sep or not n.isdigit() or not m.isdigit():
            raise SpecError(f"--pattern must be 'unstructured' or N:M such as 2:4, got '{pattern}'")
        parts.append(f"nm-structure{{n={n},m={m}}}")
    parts.append(f"prune{{method={method}}}")
    parts.extend(name.strip() for name in (recover or "").split(",") if name.strip() and name.strip() != "none")
    if quantize and quantize != "none":
        parts.append(f"quantize{{scheme={quantize}}}")
    return ",".join(parts)


@dataclass(frozen=True)
class CompileOptions:
    model: str = DEFAULT_MODEL
    out: Path = Path("artifacts/out")
    passes: str | None = None
    recipe: Path | None = None
    plugins: tuple[str, ...] = ()
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)
    force: bool = False
    dump_ir: Path | None = None
    backends: tuple[str, ...] = ()
    shorthand: dict[str, Any] = field(default_factory=dict)
    eval_data: str | None = None
    verify: dict[str, Any] = field(default_factory=dict)  # batch_size, seqlen, threads, runs, gates
    tokenizer: str | None = None  # --tokenizer: for a model directory without one of its own
    seed: int = 0
    max_accuracy_drop: float | None = None  # without a sparsity: search the highest one within this budget
    stream: bool | None = None  # stream blocks from disk (None: when the model would not fit; docs/streaming.md)
    max_memory: int | None = None  # bytes the compile may keep resident (mode choice, chunks per block call)


@dataclass
class CompileResult:
    out: Path
    manifest: dict[str, Any]
    report: dict[str, Any]


def resolve_pipeline(opts: CompileOptions, registry: Registry) -> tuple[Pipeline, dict[str, Any]]:
    if opts.recipe and opts.passes:
        raise SpecError("give either --recipe or --passes, not both")
    if opts.recipe:
        recipe = Recipe.load(opts.recipe, registry)
        return recipe.pipeline, recipe.settings
    if opts.passes:
        if any(v is not None for v in opts.shorthand.values()):
            raise SpecError("--sparsity/--allocation/--method/--pattern/--quantize cannot be combined with --passes")
        return Pipeline.from_spec(opts.passes, registry), {}
    return Pipeline.from_spec(shorthand_spec(**opts.shorthand), registry), {}


def save_model(ir: ModelIR, directory: Path) -> dict[str, Any] | None:
    """The transformed model as a loadable Hugging Face directory, or safetensors for plain modules.
    A streamed model is written shard by shard; its streaming record (mode, memory, I/O) is returned."""
    directory.mkdir(parents=True, exist_ok=True)
    if is_streamed(ir):
        from compiler.streaming.report import streaming_record
        from compiler.streaming.shard_writer import write_streamed_model

        written = write_streamed_model(ir, directory)
        _copy_sentence_transformers_files(ir.source_dir, directory)
        return streaming_record(ir, written)
    if hasattr(ir.module, "save_pretrained"):
        ir.module.save_pretrained(directory, safe_serialization=True)
        if ir.tokenizer is not None:
            ir.tokenizer.save_pretrained(directory)
        _copy_sentence_transformers_files(ir.source_dir, directory)
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in ir.module.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
    return None


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


def _copy_sentence_transformers_files(source: Path | None, directory: Path) -> None:
    """Keep a sentence-transformers model loadable as one (its pooling config says how to embed)."""
    import shutil

    if source is None:
        return
    for name in SENTENCE_TRANSFORMERS_FILES:
        src = Path(source) / name
        if src.is_dir():
            shutil.copytree(src, directory / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, directory / name)


def compile_model(opts: CompileOptions, progress: Callable[[str, int, int], None] | None = None,
                  instruments: list[Any] | None = None) -> CompileResult:
    registry = Registry.default(opts.plugins)
    pipeline, settings = resolve_pipeline(opts, registry)
    budget = _budget_config(opts)
    calib_cfg = _calibration_config(opts, settings)
    backends = tuple(opts.backends or settings.get("backends") or ())
    if backends:
        from runtimes.registry_helpers import check_backends_available

        _check_quant_forms(pipeline, backends, registry)  # first: a declaration, true whether installed or not
        check_backends_available(registry, backends)
    writer = ArtifactWriter(opts.out, opts.force)
    writer.check_destination()  # fail before the (slow) model load

    started = time.perf_counter()
    # recovery passes (reconstruct, prune-grow, finetune) read the dense model: ctx.extras["dense"]
    needs_dense = any(getattr(p, "needs_dense", False) for p in pipeline.passes)
    keep_dense = bool(opts.eval_data or backends or needs_dense or budget)
    ir = _load_ir(opts, calib_cfg, backends, keep_dense)
    try:
        return _compile_loaded(opts, ir, pipeline, registry, budget, calib_cfg, backends, writer, keep_dense, started,
                               progress, instruments)
    finally:
        if is_streamed(ir):
            ir.close()


def _load_ir(opts: CompileOptions, calib_cfg: CalibrationConfig, backends: tuple[str, ...], keep_dense: bool) -> ModelIR:
    """The model in memory, or streamed block by block from disk (compiler/streaming, docs/streaming.md)."""
    from compiler.streaming.runner import decide, load_ir

    decision = decide(opts.model, opts.stream, opts.max_memory, copies=2 if keep_dense else 1,
                      samples=calib_cfg.samples, seqlen=calib_cfg.seqlen)
    if decision.stream and backends:
        raise SpecError("--backend cannot lower a streamed compile (the ONNX export holds the whole model; docs/streaming.md): "
                        "compile without --backend, or with --no-stream on a machine where the model fits")
    return load_ir(opts.model, decision, Path(opts.out).resolve().parent, calib_cfg.samples, calib_cfg.seqlen)


def _compile_loaded(opts: CompileOptions, ir: ModelIR, pipeline: Pipeline, registry: Registry, budget: Any,
                    calib_cfg: CalibrationConfig, backends: tuple[str, ...], writer: ArtifactWriter, keep_dense: bool,
                    started: float, progress: Callable[[str, int, int], None] | None,
                    instruments: list[Any] | None) -> CompileResult:
    source_hash = ir.weights_sha256() if is_streamed(ir) else state_dict_sha256(ir.module)
    dense = ir.clone() if keep_dense else None
    torch.manual_seed(opts.seed)
    if opts.tokenizer:  # --tokenizer (the CLI validated it before the model loaded)
        from compiler.trace import load_tokenizer

        ir.tokenizer = load_tokenizer(opts.tokenizer, ir.config)
        if dense is not None:
            dense.tokenizer = ir.tokenizer

    calib_holder: dict[str, CalibrationSet] = {}

    def calibration() -> CalibrationSet:
        if "set" not in calib_holder:
            calib_holder["set"] = build_calibration(ir, calib_cfg)
        return calib_holder["set"]

    ctx = PassContext(calibration=calibration, seed=opts.seed, progress=progress or (lambda *a: None),
                      extras={"registry": registry, "dense": dense})
    timing = TimingInstrument()
    insts: list[Any] = [timing, *(instruments or [])]
    if opts.dump_ir:
        insts.append(DumpIRInstrument(Path(opts.dump_ir)))
    budget_report = None
    if budget is not None:
        from compiler.accuracy_budget import search_sparsity

        found = search_sparsity(ir, dense, ctx, lambda s: Pipeline.from_spec(
            shorthand_spec(**{**opts.shorthand, "sparsity": s}), registry), budget, insts)
        run, pipeline, budget_report = found.run, found.pipeline, found.report
    else:
        run: PipelineRun = pipeline.run(ir, ctx, insts)
    ir = run.ir
    ir.refresh_measured_sparsity()

    with writer:
        root = writer.root
        streamed = save_model(ir, root / "model")
        manifest = {
            "tool": {"name": "sparsec", "version": __version__, "python": platform.python_version(),
                     "torch": torch.__version__},
            "source": {"model": opts.model, "resolved": str(ir.source_dir) if ir.source_dir else opts.model,
                       "model_type": ir.model_type, "sha256": source_hash, "tokenizer": opts.tokenizer,
                       "architectures": list(getattr(ir.config, "architectures", None) or [])},
            "pipeline": pipeline.spec(),
            "calibration": calib_holder["set"].manifest() if calib_holder else {**vars(calib_cfg), "used": False},
            "seed": opts.seed,
            "structure": {"blocks": [{"index": b.index, "name": b.name, "layers": list(b.layers)} for b in ir.blocks]},
            "plan": {n: p.to_dict() for n, p in ir.plan.items()},
            "analyses": _manifest_analyses(run.analyses),
        }
        report = build_report(manifest, run.records)
        if streamed is not None:
            report["streaming"] = streamed
        if budget_report:
            report["accuracy_budget"] = budget_report
        if opts.eval_data:
            from compiler.evaluate import evaluate_pair

            report["evaluation"] = evaluate_pair(dense, ir, opts.eval_data, calib_cfg)
        if backends:
            from compiler.lowering.lower import lower_artifact
            from runtimes.base import lower_for_backends
            from runtimes.measure.dense import cache_dense_reference, needs_source_model, reference_quants
            from runtimes.measure.verify import verify_backends

            calib = calib_holder.get("set")
            lowering = lower_artifact(ir, root, backends, calib=calib, registry=registry)
            lower_for_backends(registry, backends, root, lowering, manifest["plan"], opts.verify)
            cache_dense_reference(dense, source_hash, opts.verify, calib, reference_quants(ir.plan, backends, registry),
                                  needs_source_model(backends, registry))
            lowering["lowered_for"] = list(backends)
            manifest["lowering"] = lowering
            report["backends"] = verify_backends(root, manifest, backends, registry, opts.verify)
        report["compile_seconds"] = round(time.perf_counter() - started, 3)
        plot_plan(manifest, root / "plots")
        write_json(root / REPORT_JSON, report)
        (root / REPORT_MD).write_text(render_markdown(report, manifest), encoding="utf-8")
        out = writer.commit(manifest)
    return CompileResult(out, manifest, report)


def _check_quant_forms(pipeline: Pipeline, backends: tuple[str, ...], registry: Registry) -> None:
    """A weight-only scheme (int4) on a backend that declares no form for it is refused before the model
    loads: that backend would otherwise run the fp32 graph while the report says int4."""
    from compiler.lowering.quant import backends_without_form

    for p in pipeline.passes:
        scheme = getattr(p, "scheme", None) if p.name == "quantize" else None
        missing = backends_without_form(scheme, backends, registry) if scheme else []
        if missing:
            runs = [b for b in registry.backends if registry.get_backend(b).quant_form(scheme, True)]
            raise SpecError(f"--quantize {scheme} is not supported by backend {', '.join(missing)} "
                            f"(it runs on: {', '.join(sorted(runs))})")


def _budget_config(opts: CompileOptions):
    """The accuracy-budget search settings, or None when the sparsity is given (or no budget)."""
    if opts.max_accuracy_drop is None or opts.shorthand.get("sparsity") is not None:
        return None
    if opts.passes or opts.recipe:
        raise SpecError("--max-accuracy-drop without --sparsity searches the shorthand pipeline's sparsity: "
                        "it cannot be combined with --passes/--recipe (give --sparsity to use it as a gate)")
    pattern = opts.shorthand.get("pattern")
    if pattern and pattern != "unstructured":
        raise SpecError(f"--max-accuracy-drop searches unstructured sparsity; --pattern {pattern} fixes it: give --sparsity or drop --pattern")
    from compiler.accuracy_budget import BudgetConfig

    return BudgetConfig(max_drop=opts.max_accuracy_drop)


def _calibration_config(opts: CompileOptions, settings: dict[str, Any]) -> CalibrationConfig:
    cfg = opts.calib
    recipe_cal = settings.get("calibration") or {}
    if recipe_cal:
        if not isinstance(recipe_cal, dict):
            raise SpecError("recipe: 'calibration' must be a mapping (source, samples, seqlen, seed)")
        unknown = set(recipe_cal) - {"source", "samples", "seqlen", "seed"}
        if unknown:
            raise SpecError(f"recipe: unknown calibration keys {sorted(unknown)}")
        merged = {**vars(CalibrationConfig()), **recipe_cal}
        # explicit CLI values (differing from defaults) win over the recipe
        for k, v in vars(cfg).items():
            if v != getattr(CalibrationConfig(), k):
                merged[k] = v
        cfg = CalibrationConfig(**merged)
    return cfg


def _manifest_analyses(analyses: dict[str, Any]) -> dict[str, Any]:
    """Only JSON-able analysis summaries go to the manifest (per-layer float maps and small dicts)."""
    return {k: jsonable(v) for k, v in analyses.items() if not k.startswith("_")}
