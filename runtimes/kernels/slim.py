"""The slim artifact: what a server running `--backend sparsec` reads, and nothing else.

A compiled artifact carries every backend's form: the fp32 ONNX graph and its int8 variants (onnx/), the
transformed Hugging Face model in fp32 (model/: what `sparsec lower` re-lowers from and what verification's
dense side needs), and our packed weights (sparsec/). The sparsec host reads only the packed file and, from
model/, the tensors of the layers that stayed ordinary (embeddings, norms, unplanned projections): on
SmolLM2 70 % int8 that is 73 MB + 113 MB of a 3.7 GB artifact. `sparsec package --backend sparsec` bundles
this slim copy (runtimes/serve/package.py asks the backend for it):

    manifest.json     the source manifest with `files` re-hashed over the slim copy, `lowering.files.model` and
                      `lowering.backend_files` pointing at what is here, and a `slim` record (backend, the
                      source manifest's sha256, bytes kept and dropped); it verifies like any artifact
    model/            config, tokenizer, generation config, chat template; model.safetensors holds only the
                      tensors outside the packed layers (a packed layer's dense weight is never read)
    sparsec/          the packed weights and format.json, byte for byte
    onnx/signature.onnx   the generic graph's inputs and outputs only (no node, no weight): what `serve` reads
                      the request contract from; it is not runnable and no backend is pointed at it
    report.*, plots/  the verification evidence, byte for byte

Other backends refuse a slim artifact in one line (`runtimes.serve.model.find_onnx`), and so do `verify` and
`lower` (`Artifact.require_full`): it holds neither their graphs nor the dense model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.artifact import MANIFEST, Artifact, hash_files, sha256_file, write_json

SIGNATURE = "onnx/signature.onnx"
EVIDENCE = ("report.json", "report.md", "plots")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class SlimResult:
    root: Path
    kept_bytes: int
    dropped_bytes: int
    kept_tensors: int
    dropped_tensors: int


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _packed_layers(art: Artifact, packed_rel: str) -> list[str]:
    fmt = art.path(packed_rel) / "format.json"
    if not fmt.is_file():
        raise FileNotFoundError(f"error: artifact '{art.root}' has no packed weights ({packed_rel}/format.json): "
                                f"run `sparsec lower {art.root} --backend sparsec` first")
    return sorted(json.loads(fmt.read_text(encoding="utf-8"))["layers"])


def _write_unpacked_tensors(model_dir: Path, packed: list[str], out: Path) -> tuple[int, int]:
    """model.safetensors of `out` with every tensor of model_dir outside the packed layers; (kept, dropped)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from runtimes.kernels.torch_host import safetensors_files

    prefixes = tuple(p + "." for p in packed)
    kept: dict[str, Any] = {}
    dropped = 0
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    dropped += 1
                else:
                    kept[key] = f.get_tensor(key).contiguous()
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    return len(kept), dropped


def _write_signature(graph: Path, out: Path) -> None:
    """An ONNX file with the graph's inputs and outputs and nothing else (read_signature's contract)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    stub = helper.make_model(helper.make_graph([], "signature", inputs, list(model.graph.output)),
                             opset_imports=list(model.opset_import), producer_name="sparsec-slim")
    stub.ir_version = model.ir_version
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(stub, str(out))


def write_slim_artifact(art: Artifact, out: str | Path, backend: str = "sparsec") -> SlimResult:
    """Write the slim copy of `art` (verified by the caller) into the empty or absent directory `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"error: '{out}' is not empty")
    lowering = dict(art.manifest.get("lowering") or {})
    packed_rel = (lowering.get("backend_files") or {}).get(backend) or "sparsec"
    packed = _packed_layers(art, packed_rel)
    model_dir = art.path("model")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"error: artifact '{art.root}' has no model/ directory")
    generic = art.path((lowering.get("files") or {}).get("model", "onnx/model.onnx"))
    if not generic.is_file():
        raise FileNotFoundError(f"error: artifact '{art.root}' has no generic graph '{generic.name}' to read the "
                                "serving signature from")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(art.path(packed_rel), out / packed_rel)
    (out / "model").mkdir()
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.name not in HF_WEIGHT_FILES and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / "model" / p.name)
    kept_tensors, dropped_tensors = _write_unpacked_tensors(model_dir, packed, out / "model")
    _write_signature(generic, out / SIGNATURE)
    for rel in EVIDENCE:
        src = art.path(rel)
        if src.is_dir():
            shutil.copytree(src, out / rel)
        elif src.is_file():
            shutil.copy2(src, out / rel)
    kept, total = _tree_bytes(out), _tree_bytes(art.root)
    lowering["files"] = {"model": SIGNATURE}
    lowering["backend_files"] = {backend: packed_rel}
    manifest = dict(art.manifest)
    manifest["lowering"] = lowering
    manifest["slim"] = {"backend": backend, "source_manifest_sha256": sha256_file(art.path(MANIFEST)),
                        "kept_bytes": kept, "dropped_bytes": total - kept, "packed_layers": len(packed),
                        "dropped_tensors": dropped_tensors}
    manifest["files"] = hash_files(out)
    write_json(out / MANIFEST, manifest)
    return SlimResult(out, kept, total - kept, kept_tensors, dropped_tensors)
