"""Lowering: a compiled ModelIR → ONNX files inside the artifact (+ a dense reference outside it).

Contract (relied on by compile.py, the runtimes, DeepSparse and the server):

`lower_artifact(ir, dense_ir, root, backends, calib, options) -> dict` writes
- `root/onnx/model.onnx`: the compiled model, fp32, dynamic axes batch + sequence, opset 17 by
  `torch.onnx.export(dynamo=False)` (IR 8, loadable by DeepSparse), pruning zeros kept as exact
  zeros in the initializers, weights in `model.onnx.data` beside it above 1.5 GB;
- `root/onnx/<variant>/model.onnx`: int8 variants when the plan quantizes (`quantize` pass), each in
  the form its backend runs fast (see compiler/lowering/quant.py): `int8-dynamic` (ORT
  MatMulInteger), `int8-qdq` (ORT static QDQ, OpenVINO), `int8-qoperator` (QLinearMatMul, DeepSparse);
- causal LMs of the Llama family: beside `model.onnx` and each onnxruntime variant, `decode_gqa.onnx`, the
  same model as onnxruntime's fused decode graph (GroupQueryAttention, in-place KV cache;
  compiler/lowering/gqa.py) — onnxruntime's decoder runs it; `"decode_graph"` in the section says
  whether it was written, or why not;
- beside every graph (`onnx/` and each variant directory) the Hugging Face files that make it load as
  it is in optimum's `ORTModel*` classes under transformers 4.x and 5.x: `config.json`, the tokenizer,
  `generation_config.json` (causal LMs), the sentence-transformers pooling config (sentence encoders)
  — compiler/lowering/hf_files.py; tests/test_optimum_interop.py proves it with optimum-onnx;

and returns the manifest's "lowering" section:
    {"task": "feature-extraction" | "text-classification" | "text-generation" | "module",
     "model_type", "inputs": [...], "outputs": [...], "opset", "ir_version",
     "files": {"model": "onnx/model.onnx", ...}, "variants": {name: {file, format, scheme, backends, ...}},
     "backend_files": {backend: file it runs}, "kv": {layers, kv_heads, head_dim, dtype} (LMs),
     "numerics": {output: max_abs_diff vs the torch model}, "zeros": {...}, "checks": [...],
     "sizes": {file: {bytes, compressed_bytes}}, "hf_files": [names beside each graph]}

Encoders take input_ids, attention_mask (+ token_type_ids) → last_hidden_state. Causal LMs use
optimum's names: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value → logits,
present.{i}.key/value (one graph for prefill and decode). `compiler.lowering.feeds` builds feeds.

The dense reference (the source model lowered the same way, cached outside the artifact) is
verification's business: runtimes/measure/dense.py, filled by the compile driver right after lowering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compiler.ir import ModelIR
from compiler.lowering.export import GraphSpec, export_onnx, torch_outputs
from compiler.lowering.feeds import graph_feeds, lm_feeds, present_to_past, text_batch
from compiler.lowering.files import MODEL_FILE, file_sizes, path_rel
from compiler.lowering.format import OPSET, LoweringError, load_onnx
from compiler.lowering.gqa import write_fused_graph
from compiler.lowering.hf_files import copy_hf_files, write_hf_files
from compiler.lowering.quant import planned_scheme, variants_for_scheme, write_variants
from compiler.lowering.rules import graph_rules, zeros_report

LOWERING_FORMAT = 4  # bump when the exported graph changes, invalidates the dense cache
NUMERICS_TEXTS = ("sparsec lowers this model to ONNX and checks the numbers.",
                  "Short text.", "A third, somewhat longer sentence that makes the padding visible in the batch.")

__all__ = ["lower_artifact", "lower_model", "LoweringError", "LOWERING_FORMAT"]


# -- the artifact --------------------------------------------------------------------------------
def lower_artifact(ir: ModelIR, root: Path, backends: tuple[str, ...] | list[str] = (), calib: Any = None,
                   registry: Any = None) -> dict[str, Any]:
    """Lower the compiled model (+ int8 variants) into `root/onnx`; returns the manifest section.

    Which int8 variants are written, and which backend runs each, comes from the backends' declared
    `quant_forms` (`compiler.lowering.quant.variants_for_scheme`); `registry` (default: the installed
    entry points) says which backends exist. A backend that owns another lowered form writes it in its
    own `Backend.lower` hook, called by the compile driver after this."""
    root = Path(root)
    path = root / MODEL_FILE
    spec, section = lower_model(ir, path)
    hf_files = write_hf_files(ir, path.parent, spec.task, spec.inputs)
    scheme = planned_scheme(ir)
    wanted = variants_for_scheme(scheme, tuple(backends), registry) if scheme else {}
    variants = write_variants(ir, path, root, section, scheme, calib, wanted) if scheme and wanted else {}
    section["variants"] = {name: v for name, v in variants.items()}
    for v in variants.values():
        if (root / v["file"]).parent != path.parent:
            copy_hf_files(hf_files, path.parent, (root / v["file"]).parent)
    section["hf_files"] = hf_files
    section["backend_files"] = {b: v["file"] for v in variants.values() for b in v["backends"]}
    section["quantization"] = scheme
    section["sizes"] = {rel: file_sizes(root / rel) for rel in (section["files"]["model"], *(v["file"] for v in variants.values()))}
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
        section["decode_graph"] = write_fused_graph(ir, spec, path, _numerics_prompt(ir))
    data = path.parent / "model.onnx.data"
    if data.exists():
        section["files"]["model_data"] = path_rel(data)
    return spec, section


def _numerics_prompt(ir: ModelIR) -> np.ndarray:
    """One unpadded prompt (1, n) of real text (or fixed ids without a tokenizer) for the fused graph's check."""
    if ir.tokenizer is not None:
        ids = ir.tokenizer(NUMERICS_TEXTS[0])["input_ids"]
        if len(ids) >= 2:
            return np.asarray([ids], dtype=np.int64)
    vocab = int(getattr(ir.config, "vocab_size", 100) or 100)
    return (np.arange(12).reshape(1, 12) * 7 % vocab).astype(np.int64)


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
