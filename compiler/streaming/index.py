"""What a Hugging Face safetensors checkpoint holds, read from its headers only: every tensor's shard,
dtype and shape. Nothing is loaded, so the size of a 7B model is known in milliseconds.

Why headers and not `safe_open`: the header is a JSON blob after an 8-byte length; parsing it opens no
memory map, so sizing a model costs no resident memory at all.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    shard: str  # file name inside the checkpoint directory
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class CheckpointIndex:
    directory: Path
    tensors: dict[str, TensorInfo]

    @classmethod
    def from_dir(cls, directory: str | Path) -> "CheckpointIndex":
        root = Path(directory)
        if (root / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((root / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelLoadError(f"'{root / INDEX_FILE}' is not a safetensors index: {exc}") from None
            shards = sorted(set(weight_map.values()))
        elif (root / SINGLE_FILE).is_file():
            shards = [SINGLE_FILE]
        else:
            raise ModelLoadError(f"'{root}' has no {SINGLE_FILE} or {INDEX_FILE}: streaming reads safetensors checkpoints only")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for key, info in read_header(root / shard).items():
                tensors[key] = TensorInfo(shard, info[0], info[1])
        return cls(root, tensors)

    def nbytes(self, dtype: torch.dtype | None = None, keys: list[str] | None = None) -> int:
        """Bytes of the tensors on disk, or once converted to `dtype` (floating tensors only)."""
        total = 0
        for key in keys if keys is not None else list(self.tensors):
            t = self.tensors[key]
            total += t.numel * dtype.itemsize if dtype is not None and t.dtype.is_floating_point else t.nbytes
        return total

    def disk_dtypes(self) -> list[str]:
        return sorted({str(t.dtype).replace("torch.", "") for t in self.tensors.values()})


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} from one safetensors file's header."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"'{path}' is not a readable safetensors file: {exc}") from None
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ModelLoadError(f"'{path}': tensor '{key}' has dtype {meta['dtype']}, which streaming does not read")
        out[key] = (DTYPES[meta["dtype"]], tuple(int(s) for s in meta["shape"]))
    return out
