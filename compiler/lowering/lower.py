"""Lowering: a compiled ModelIR → ONNX files inside the artifact (+ a dense reference outside it).

Contract (relied on by compile.py, the runtimes, DeepSparse and the server):

`lower_artifact(ir, dense_ir, root, backends, calib, options) -> dict` writes
- `root/onnx/model.onnx`: the compiled model, fp32, dynamic axes batch + sequence, opset 17 by
  `torch.onnx.export(dynamo=False)` (IR 8, loadable by DeepSparse), pruning zeros kept as exact
  zeros in the initializers, weights in `model.onnx.data` beside it above 1.5 GB;
- `root/onnx/<variant>/model.onnx`: int8 variants when the plan quantizes (`quantize` pass), each in
  the form its backend runs fast (see compiler/lowering/quant.py): `int8-dynamic` (ORT
  MatMulInteger), `int8-qdq` (ORT static QDQ, OpenVINO), `int8-qoperator` (QLinearMatMul, DeepSparse);
- causal LMs also get `config.json`, `generation_config.json` and the tokenizer in `root/onnx/`,
  the layout optimum's `ORTModelForCausalLM` loads (see docs/lowering.md for the optimum decision);

and returns the manifest's "lowering" section:
    {"task": "feature-extraction" | "text-classification" | "text-generation" | "module",
     "model_type", "inputs": [...], "outputs": [...], "opset", "ir_version",
     "files": {"model": "onnx/model.onnx", ...}, "variants": {name: {file, format, scheme, backends, ...}},
     "backend_files": {backend: file it runs}, "kv": {layers, kv_heads, head_dim, dtype} (LMs),
     "numerics": {output: max_abs_diff vs the torch model}, "zeros": {...}, "checks": [...],
     "sizes": {file: {bytes, compressed_bytes}}}

Encoders take input_ids, attention_mask (+ token_type_ids) → last_hidden_state. Causal LMs use
optimum's names: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value → logits,
present.{i}.key/value (one graph for prefill and decode). `compiler.lowering.feeds` builds feeds.

`dense_reference(manifest, options)` lowers the *source* model (manifest `source.resolved`) into a
cache directory outside the artifact (`$SPARSEC_CACHE_DIR` or ~/.cache/sparsec, keyed by the source
weights' sha256), for `sparsec verify ARTIFACT` to compare against; `lower_artifact` fills that
cache from the dense IR it already holds, so verification right after compile reloads nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import SparsecError
from compiler.ir import ModelIR
from compiler.lowering.export import (OPSET, GraphSpec, LoweringError, export_onnx, graph_spec, load_onnx,
                                      torch_outputs)
from compiler.lowering.feeds import graph_feeds, lm_feeds, present_to_past, text_batch

MODEL_FILE = "onnx/model.onnx"
MAX_IR_VERSION = 9  # DeepSparse loads ONNX IR <= 9
LOWERING_FORMAT = 2  # bump when the exported graph changes, invalidates the dense cache
NUMERICS_TEXTS = ("sparsec lowers this model to ONNX and checks the numbers.",
                  "Short text.", "A third, somewhat longer sentence that makes the padding visible in the batch.")

__all__ = ["lower_artifact", "lower_model", "dense_reference", "model_file", "LoweringError", "graph_rules",
           "layer_nodes", "zeros_report"]


# -- the artifact --------------------------------------------------------------------------------
def lower_artifact(ir: ModelIR, dense_ir: ModelIR | None, root: Path, backends: tuple[str, ...] | list[str],
                   calib: Any = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Lower the compiled model (+ quant variants) into `root/onnx`; returns the manifest section."""
    from compiler.lowering.quant import planned_scheme, write_variants

    options = options or {}
    root = Path(root)
    path = root / MODEL_FILE
    spec, section = lower_model(ir, path)
    if spec.task == "text-generation":
        _save_hf_side_files(ir, path.parent)
    scheme = planned_scheme(ir)
    variants = write_variants(ir, path, root, section, scheme, calib, tuple(backends)) if scheme else {}
    section["variants"] = {name: v for name, v in variants.items()}
    section["backend_files"] = {b: v["file"] for v in variants.values() for b in v["backends"]}
    section["quantization"] = scheme
    section["sizes"] = {rel: file_sizes(root / rel) for rel in (section["files"]["model"], *(v["file"] for v in variants.values()))}
    if dense_ir is not None:
        from compiler.compile import state_dict_sha256

        cache_dense_reference(dense_ir, state_dict_sha256(dense_ir.module), options, calib,
                              reference_quants(ir.plan, backends))
    return section


def lower_model(ir: ModelIR, path: Path) -> tuple[GraphSpec, dict[str, Any]]:
    """Export one model to `path`, check our rules and its numerics against torch."""
    spec = export_onnx(ir, path)
    model = load_onnx(path)
    checks = graph_rules(model, spec)
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise LoweringError(f"lowered graph breaks rule '{failed[0]['rule']}': {failed[0]['detail']}")
    section: dict[str, Any] = {
        "task": spec.task,
        "model_type": getattr(ir.config, "model_type", None) or ir.model_type,
        "inputs": list(spec.inputs),
        "outputs": list(spec.outputs),
        "opset": OPSET,
        "ir_version": int(model.ir_version),
        "files": {"model": path_rel(path)},
        "numerics": numerics_vs_torch(ir, spec, path),
        "zeros": zeros_report(ir, model),
        "checks": checks,
    }
    if spec.kv is not None:
        section["kv"] = spec.kv.to_dict()
    data = path.parent / "model.onnx.data"
    if data.exists():
        section["files"]["model_data"] = path_rel(data)
    return spec, section


def file_sizes(path: Path, cache: bool = False) -> dict[str, int]:
    """Bytes on disk (graph + external data) and deflate-compressed (zlib level 1, streamed: fast,
    and enough to show how much of a file is zeros). With `cache`, the result is kept beside the
    file (for the dense references in the cache directory, measured once)."""
    files = [path] + ([path.parent / "model.onnx.data"] if (path.parent / "model.onnx.data").exists() else [])
    raw = sum(f.stat().st_size for f in files)
    stamp = f"{raw}:{max(f.stat().st_mtime_ns for f in files)}"
    memo = path.with_name(path.name + ".sizes.json")
    if cache and memo.is_file():
        data = json.loads(memo.read_text(encoding="utf-8"))
        if data.get("stamp") == stamp:
            return {"bytes": data["bytes"], "compressed_bytes": data["compressed_bytes"]}
    comp = zlib.compressobj(1)
    packed = 0
    for f in files:
        with open(f, "rb") as src:
            while block := src.read(1 << 22):
                packed += len(comp.compress(block))
    packed += len(comp.flush())
    out = {"bytes": raw, "compressed_bytes": packed}
    if cache:
        memo.write_text(json.dumps({"stamp": stamp, **out}), encoding="utf-8")
    return out



def path_rel(path: Path) -> str:
    """`onnx/...` relative path of a file under an artifact root (paths in the manifest are relative)."""
    parts = path.parts
    dirs = parts[:-1]
    if "onnx" not in dirs:
        return path.name
    last = len(dirs) - 1 - dirs[::-1].index("onnx")  # the artifact's own onnx/, whatever its parents are called
    return "/".join(parts[last:])


def model_file(lowering: dict[str, Any], backend: str) -> str:
    """The artifact-relative ONNX file `backend` runs: its quant variant, else the fp32 model."""
    return lowering.get("backend_files", {}).get(backend, lowering["files"]["model"])


def _save_hf_side_files(ir: ModelIR, directory: Path) -> None:
    """config.json, generation_config.json and the tokenizer beside the graph (optimum's layout)."""
    if ir.config is not None and hasattr(ir.config, "save_pretrained"):
        config = ir.config.__class__.from_dict(ir.config.to_dict())
        config.use_cache = True
        config.save_pretrained(directory)
    gen = getattr(ir.module, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(directory)
    if ir.tokenizer is not None:
        ir.tokenizer.save_pretrained(directory)


# -- checks --------------------------------------------------------------------------------------
def graph_rules(model: Any, spec: GraphSpec | None = None) -> list[dict[str, Any]]:
    """Our rules for a lowered graph, each {rule, ok, detail}; used after export and to explain a
    runtime's rejection of a file."""
    domains = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    rules = [
        {"rule": f"ir_version <= {MAX_IR_VERSION}", "ok": model.ir_version <= MAX_IR_VERSION,
         "detail": f"ir_version is {model.ir_version}"},
        {"rule": f"default opset {OPSET}", "ok": domains.get("ai.onnx") == OPSET,
         "detail": f"opset imports {domains}"},
    ]
    stray = sorted(d for d in domains if d not in ("ai.onnx", "com.microsoft"))
    rules.append({"rule": "no stray opset domains", "ok": not stray, "detail": f"domains {sorted(domains)}"})
    if spec is not None:
        ins = [i.name for i in model.graph.input]
        outs = [o.name for o in model.graph.output]
        rules.append({"rule": "input/output names follow the contract",
                      "ok": ins[: len(spec.inputs)] == list(spec.inputs) and outs == list(spec.outputs),
                      "detail": f"inputs {ins}, outputs {outs}"})
    return rules


def explain_rejection(backend: str, path: Path, exc: BaseException) -> SparsecError:
    """A runtime refused a file: its own message plus which of our rules the file breaks (if any)."""
    try:
        failed = [c for c in graph_rules(load_onnx(path)) if not c["ok"]]
        ours = ("; breaks our rule " + ", ".join(f"'{c['rule']}' ({c['detail']})" for c in failed)) if failed \
            else "; the file passes all our rules (ir_version, opset, domains)"
    except Exception as load_exc:  # noqa: BLE001
        ours = f"; not even loadable by onnx: {type(load_exc).__name__}: {load_exc}"
    msg = " ".join(str(exc).split())[:400]
    return LoweringError(f"{backend} rejected '{path}': {type(exc).__name__}: {msg}{ours}")


def layer_nodes(model: Any, layer_names: Any) -> dict[str, tuple[str, str]]:
    """Map prunable layer names to (node name, weight initializer) in an exported graph.

    TorchScript export names nodes by module scope (`/model/encoder/layer.0/attention/self/query/MatMul`);
    with '/' read as '.', the scope minus the wrapper's attribute is the layer's qualified name — or
    its unique suffix, when a module's forward left no scope (OPT's `model.` level does not show)."""
    inits = {i.name for i in model.graph.initializer}
    wanted = set(layer_names)
    found: dict[str, tuple[str, str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        weight = node.input[1] if node.input[1] in inits else (node.input[0] if node.input[0] in inits else None)
        if weight is None:
            continue
        scope = node.name.strip("/").replace("/", ".").rpartition(".")[0]
        scope = scope.partition(".")[2]  # drop the export wrapper's attribute ("model")
        if not scope:
            continue
        matches = [scope] if scope in wanted else [n for n in wanted if n.endswith("." + scope)]
        if len(matches) == 1 and matches[0] not in found:
            found[matches[0]] = (node.name, weight)
    return found


def zeros_report(ir: ModelIR, model: Any) -> dict[str, Any]:
    """Exact zeros of every prunable weight in torch vs in its ONNX initializer."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    mapping = layer_nodes(model, list(ir.layers))
    mismatched, torch_zeros, onnx_zeros = [], 0, 0
    for name, (_, init_name) in mapping.items():
        tz = int((ir.weight(name) == 0).sum())
        oz = int((numpy_helper.to_array(inits[init_name]) == 0).sum())
        torch_zeros += tz
        onnx_zeros += oz
        if tz != oz:
            mismatched.append(name)
    unmapped = [n for n in ir.layers if n not in mapping]  # e.g. a pooler the graph's outputs never use
    return {"layers_mapped": len(mapping), "layers_total": len(ir.layers), "torch_zeros": torch_zeros,
            "onnx_zeros": onnx_zeros, "preserved": not mismatched and onnx_zeros == torch_zeros,
            "mismatched": mismatched[:10], "unmapped": unmapped[:10]}


def numerics_vs_torch(ir: ModelIR, spec: GraphSpec, path: Path) -> dict[str, float]:
    """Max |onnxruntime − torch| per output on real (padded) text, plus a decode step for LMs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    section = {"task": spec.task, "inputs": list(spec.inputs), **({"kv": spec.kv.to_dict()} if spec.kv else {})}
    worst: dict[str, float] = {}
    for feeds, valid in _numerics_feeds(ir, spec, section, sess):
        got = dict(zip(spec.outputs, sess.run(list(spec.outputs), feeds)))
        ref = torch_outputs(ir, spec, feeds)
        for name in spec.outputs:
            diff = np.abs(got[name].astype(np.float32) - ref[name])
            if valid is not None and diff.ndim >= 2 and diff.shape[:2] == valid.shape:
                diff = diff[valid]
            worst[name] = max(worst.get(name, 0.0), float(diff.max()) if diff.size else 0.0)
    return worst


def _numerics_feeds(ir: ModelIR, spec: GraphSpec, section: dict[str, Any], sess: Any):
    """(feeds, valid-token mask or None) pairs: a padded text batch; for LMs also one decode step."""
    if spec.task == "module":
        yield {k: v.detach().numpy() for k, v in ir.example_inputs.items()}, None
        return
    if ir.tokenizer is not None:
        seqlen = max(len(ir.tokenizer(t)["input_ids"]) for t in NUMERICS_TEXTS)
        ids, mask = text_batch(ir.tokenizer, list(NUMERICS_TEXTS), len(NUMERICS_TEXTS), seqlen)
    else:
        vocab = int(getattr(ir.config, "vocab_size", 100) or 100)
        ids = (np.arange(24).reshape(2, 12) * 7 % vocab).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 8:] = 0
    feeds = graph_feeds(section, ids, mask)
    yield feeds, mask.astype(bool)
    if spec.task == "text-generation":
        present = present_to_past(dict(zip(spec.outputs, sess.run(list(spec.outputs), feeds))))
        step = ids[:, -1:]
        step_mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        yield lm_feeds(section, step, step_mask, present), None


# -- the dense reference -------------------------------------------------------------------------
def cache_root(options: dict[str, Any] | None = None) -> Path:
    configured = (options or {}).get("cache_dir") or os.environ.get("SPARSEC_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "sparsec"


def dense_dir(source_sha256: str, options: dict[str, Any] | None = None) -> Path:
    return cache_root(options) / "dense" / f"{source_sha256[:20]}-v{LOWERING_FORMAT}"


def cache_dense_reference(dense_ir: ModelIR, source_sha256: str, options: dict[str, Any] | None,
                          calib: Any = None, quants: list[DenseQuant] = ()) -> Path:
    """Lower the dense model into the cache (once per source hash); returns the cache directory.
    Each entry of `quants` (which layers are int8, in which variants) also gets the dense model's
    int8 variants, under `quant_root(...)`."""
    from compiler.artifact import write_json
    from compiler.lowering.quant import write_variants

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
    for dq in quants:
        missing = _missing_variants(target, dq)
        if missing:
            section = json.loads((target / "lowering.json").read_text(encoding="utf-8"))
            write_variants(_with_quant_plan(dense_ir, dq.quant), target / MODEL_FILE, quant_root(target, dq.quant),
                           section, dq.scheme, calib, (), only=missing)
    return target


def quant_root(target: Path, quant: dict[str, str]) -> Path:
    """Where the dense reference's int8 variants for one set of quantized layers live in the cache."""
    import hashlib

    from compiler.lowering.quant import QUANT_FORMAT

    key = hashlib.sha256(json.dumps([QUANT_FORMAT, sorted(quant.items())]).encode()).hexdigest()[:12]
    return target / f"quant-{key}"


@dataclass(frozen=True)
class DenseQuant:
    """A dense int8 reference: which layers are quantized in which scheme, and the variants needed."""

    quant: dict[str, str]
    variants: tuple[str, ...]
    role: str  # "same-plan" (the compiled plan's quantization) | "alternative" (fastest known dense)

    @property
    def scheme(self) -> str:
        return next(iter(set(self.quant.values())))


def dense_variant_files(target: Path, dq: DenseQuant) -> dict[str, Path]:
    """Variant name → dense ONNX file in the cache."""
    root = quant_root(target, dq.quant)
    return {v: root / "onnx" / v / "model.onnx" for v in dq.variants}


def _missing_variants(target: Path, dq: DenseQuant) -> tuple[str, ...]:
    return tuple(v for v, p in dense_variant_files(target, dq).items() if not p.is_file())


def _with_quant_plan(dense_ir: ModelIR, quant: dict[str, str]) -> ModelIR:
    """The dense model with the given quantization decisions (a shallow copy: the caller's plan is
    untouched)."""
    import copy

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


def reference_quants(plan: dict[str, Any], backends: tuple[str, ...] | list[str]) -> list[DenseQuant]:
    """Which dense int8 references verification needs: the compiled plan's own quantization (same
    layers, same scheme, every variant), and the fastest known dense alternative of the backends
    (onnxruntime: int8-dynamic on every block layer, DESIGN §5)."""
    from compiler.lowering.quant import variants_for_scheme

    quants = []
    own = plan_quant(plan)
    if own:
        scheme = next(iter(set(own.values())))
        quants.append(DenseQuant(own, tuple(variants_for_scheme(scheme, tuple(backends))), "same-plan"))
    if "onnxruntime" in backends:
        alt = block_layers_quant(plan, "int8-dynamic")
        if alt and alt != own:
            quants.append(DenseQuant(alt, ("int8-dynamic",), "alternative"))
    return quants


def dense_reference(manifest: dict[str, Any], options: dict[str, Any] | None = None,
                    backends: tuple[str, ...] | list[str] = ()) -> Path:
    """The cache directory holding the dense source model lowered like the artifact (`onnx/model.onnx`,
    plus the dense int8 variants of `reference_quants`); lowered from `source.resolved` when not
    cached yet."""
    source = manifest.get("source", {})
    sha = source.get("sha256")
    if not sha:
        raise SparsecError("the artifact's manifest has no source sha256: cannot find its dense reference")
    target = dense_dir(sha, options)
    quants = reference_quants(manifest.get("plan", {}), backends)
    if (target / MODEL_FILE).is_file() and not any(_missing_variants(target, q) for q in quants):
        return target
    from compiler.compile import state_dict_sha256
    from compiler.trace import load_and_trace

    dense_ir = load_and_trace(source.get("resolved") or source.get("model"))
    actual = state_dict_sha256(dense_ir.module)
    if actual != sha:
        raise SparsecError(f"the source model '{source.get('resolved')}' changed since compile (sha256 {actual[:12]} "
                           f"!= {sha[:12]} in the manifest): cannot build its dense reference")
    calib = _rebuild_calibration(dense_ir, manifest) if any(q.role == "same-plan" for q in quants) else None
    return cache_dense_reference(dense_ir, sha, options, calib, quants)


def _rebuild_calibration(ir: ModelIR, manifest: dict[str, Any]) -> Any:
    """The artifact's calibration samples again, from the settings in its manifest (same sha256)."""
    from compiler.calibration import CalibrationConfig, build_calibration

    cal = manifest.get("calibration") or {}
    cfg = CalibrationConfig(source=cal.get("source", "default"), samples=int(cal.get("samples", 32)),
                            seqlen=int(cal.get("seqlen", 128)), seed=int(cal.get("seed", 0)))
    if cfg.source == "example_inputs":
        cfg = CalibrationConfig(samples=cfg.samples, seqlen=cfg.seqlen, seed=cfg.seed)
    return build_calibration(ir, cfg)
