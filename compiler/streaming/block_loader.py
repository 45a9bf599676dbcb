"""Load a few tensors of a safetensors checkpoint, converted to the compute dtype.

Each call opens the shards it needs with `safe_open` and closes them before returning, and every
returned tensor owns its memory (a conversion copies; a same-dtype tensor is cloned): no file stays
memory-mapped, so the resident set is what the caller holds, and an overlay file can be replaced
while nothing maps it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from compiler.streaming.index import CheckpointIndex


def load_tensors(index: CheckpointIndex, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{key: tensor} for `keys` (fp16/bf16/fp32 on disk → `dtype`; integer tensors keep theirs)."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_shard[index.tensors[key].shard].append(key)
    out: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        with safe_open(str(Path(index.directory) / shard), framework="pt") as f:
            for key in names:
                out[key] = to_compute(f.get_tensor(key), dtype)
    return out


def to_compute(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype.is_floating_point and t.dtype != dtype:
        return t.to(dtype)
    return t.clone()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temp name, then rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
