"""Our rules for a lowered ONNX graph: checked after export, after each int8 variant, and to explain why a
runtime rejected a file. Also maps prunable layers to graph nodes (by module scope) and counts exact zeros."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.errors import SparsecError
from compiler.lowering.format import MAX_IR_VERSION, OPSET, LoweringError, load_onnx

if TYPE_CHECKING:  # annotations only: runtimes import these rules to explain a rejection, without torch
    from compiler.ir import ModelIR
    from compiler.lowering.export import GraphSpec


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
