"""Where lowered files live in an artifact, and how big they are (no torch, no onnx: the server and the
measurements read these too)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

MODEL_FILE = "onnx/model.onnx"
# the fused decode graph beside a graph onnxruntime runs (compiler/lowering/gqa.py); its decoder looks here
GQA_FILE = "decode_gqa.onnx"


def file_sizes(path: Path, cache: bool = False) -> dict[str, int]:
    """Bytes on disk (graph + external data) and deflate-compressed (zlib level 1, streamed: fast,
    and enough to show how much of a file is zeros). With `cache`, the result is kept beside the
    file (for the dense references in the cache directory, measured once)."""
    if path.is_dir():  # a backend's own lowered form (e.g. packed weights): every file in it
        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.endswith(".sizes.json"))
        memo_dir = path
    else:
        files = [path] + ([path.parent / "model.onnx.data"] if (path.parent / "model.onnx.data").exists() else [])
        memo_dir = None
    raw = sum(f.stat().st_size for f in files)
    stamp = f"{raw}:{max(f.stat().st_mtime_ns for f in files)}"
    memo = memo_dir / ".sizes.json" if memo_dir is not None else path.with_name(path.name + ".sizes.json")
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

