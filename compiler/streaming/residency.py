"""Which blocks' weights are in memory, and where the others are.

The model's parameters live on the meta device. Everything outside the repeated blocks (embeddings,
final norm, LM head: the "outer" part) is loaded once and stays resident. Block weights are loaded
on demand — by a forward pre-hook on every block (so any full forward of the model works, one block
at a time) and by `acquire` (the IR calls it when a pass reaches into a block) — and at most
`capacity` blocks are resident: acquiring another evicts the least recently used one. An evicted
block whose weights changed is written to the overlay (one safetensors file per block, compute dtype)
and read from there afterwards; an unchanged one is simply dropped (the checkpoint still has it).

A block counts as changed when the IR's `set_weight` marked it, when a parameter was changed in place
(its version counter moved: `p.copy_`, `p.mul_` ...), or when a parameter's storage was replaced. A
pass that writes through `module.weight.data` without `ir.set_weight` bypasses all three (`.data`
has its own version counter) and would be lost: passes change weights through the IR.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compiler.errors import ModelLoadError
from compiler.streaming.block_loader import load_tensors, save_tensors
from compiler.streaming.index import CheckpointIndex
from compiler.streaming.meta_model import meta_like


@dataclass
class StreamCounters:
    loads: int = 0
    evictions: int = 0
    overlay_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    load_seconds: float = 0.0
    write_seconds: float = 0.0
    per_block_loads: dict[int, int] = field(default_factory=dict)


class Residency:
    def __init__(self, index: CheckpointIndex, module: nn.Module, block_names: list[str], dtype: torch.dtype,
                 work_dir: Path | None, capacity: int = 1):
        self.index, self.module, self.dtype, self.work_dir = index, module, dtype, work_dir
        self.block_names = list(block_names)
        self.capacity = max(1, capacity)
        self.params: dict[str, nn.Parameter] = dict(module.named_parameters())
        aliases: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        self.aliases = {name: aliases[id(p)] for name, p in self.params.items()}
        self.ckpt_key = {name: self._resolve(name) for name in self.params}
        self.block_params: list[list[str]] = [[n for n in self.params if n.startswith(b + ".")] for b in self.block_names]
        inside = {n for names in self.block_params for n in names}
        self.outer_params = [n for n in self.params if n not in inside]
        self.resident: list[int] = []  # least recently used first
        self.dirty: set[int] = set()
        self.loaded_state: dict[int, list[tuple[int, int]]] = {}
        self.overlay: dict[int, Path] = {}
        self.zeros: dict[str, tuple[int, int]] = {}  # param -> (zeros, numel) when last seen
        self.counters = StreamCounters()
        self.suspended = False
        self._load_outer()
        self._load_buffers()
        self.handles = [module.get_submodule(b).register_forward_pre_hook(lambda _m, _a, k=k: self._on_forward(k))
                        for k, b in enumerate(self.block_names)]

    # -- names -------------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str:
        prefix = getattr(self.module, "base_model_prefix", "") or ""
        for alias in self.aliases[name]:
            tries = [alias]
            if prefix and alias.startswith(prefix + "."):
                tries.append(alias[len(prefix) + 1:])
            elif prefix:
                tries.append(f"{prefix}.{alias}")
            for key in tries:
                if key in self.index.tensors:
                    return key
        raise ModelLoadError(f"checkpoint '{self.index.directory}' has no tensor for parameter '{name}'")

    def block_of(self, name: str) -> int | None:
        """Index of the block a module/parameter name lies in (None: outer part)."""
        for k, b in enumerate(self.block_names):
            if name == b or name.startswith(b + "."):
                return k
        return None

    # -- loading -----------------------------------------------------------------------------------
    def _load_outer(self) -> None:
        tensors = self._read({n: self.ckpt_key[n] for n in self.outer_params})
        for n, t in tensors.items():
            self._swap(n, t)

    def _load_buffers(self) -> None:
        """Persistent buffers saved in the checkpoint (most models have none: they are computed)."""
        state = self.module.state_dict(keep_vars=True)
        names = [n for n, _ in self.module.named_buffers() if n in state and n in self.index.tensors]
        for n, t in load_tensors(self.index, names, self.dtype).items():
            buf = self.module.get_buffer(n)
            buf.copy_(t.to(buf.dtype))

    def _read(self, keys: dict[str, str], overlay: Path | None = None) -> dict[str, torch.Tensor]:
        """{param name: tensor} from the overlay file or the checkpoint."""
        start = time.perf_counter()
        if overlay is not None:
            from safetensors.torch import load_file

            out = load_file(str(overlay))
        else:
            got = load_tensors(self.index, list(keys.values()), self.dtype)
            out = {n: got[k] for n, k in keys.items()}
        self.counters.bytes_read += sum(t.nbytes for t in out.values())
        self.counters.load_seconds += time.perf_counter() - start
        return out

    def _swap(self, name: str, tensor: torch.Tensor) -> None:
        param = self.params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelLoadError(f"checkpoint tensor for '{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=False))

    def _on_forward(self, k: int) -> None:
        if not self.suspended:
            self.acquire(k)

    def acquire(self, k: int) -> None:
        """Make block k resident (most recently used), evicting the oldest beyond capacity."""
        if k in self.resident:
            self.resident.remove(k)
            self.resident.append(k)
            return
        while len(self.resident) >= self.capacity:
            self.evict(self.resident[0])
        names = self.block_params[k]
        tensors = self._read({n: self.ckpt_key[n] for n in names}, self.overlay.get(k))
        for n in names:
            self._swap(n, tensors.pop(n))
        self.resident.append(k)
        self.loaded_state[k] = self._state(k)
        self.counters.loads += 1
        self.counters.per_block_loads[k] = self.counters.per_block_loads.get(k, 0) + 1

    def _state(self, k: int) -> list[tuple[int, int]]:
        """(version counter, storage address) of each parameter: reading them costs nothing."""
        return [(p._version, p.data_ptr()) for p in (self.params[n] for n in self.block_params[k])]

    def count_zeros(self, k: int) -> None:
        for n in self.block_params[k]:
            p = self.params[n]
            self.zeros[n] = (int((p == 0).sum()), p.numel())

    def mark_dirty(self, k: int) -> None:
        self.dirty.add(k)

    def changed(self, k: int) -> bool:
        return k in self.dirty or self._state(k) != self.loaded_state.get(k)

    def evict(self, k: int) -> None:
        """Drop block k from memory, writing it to the overlay first when its weights changed."""
        if k not in self.resident:
            return
        names = self.block_params[k]
        changed = self.changed(k)
        if changed:
            self.write_overlay(k)
        if changed or any(n not in self.zeros for n in names):
            self.count_zeros(k)
        for n in names:
            torch.utils.swap_tensors(self.params[n], meta_like(self.params[n]))
        self.resident.remove(k)
        self.dirty.discard(k)
        self.loaded_state.pop(k, None)
        self.counters.evictions += 1

    def write_overlay(self, k: int) -> None:
        if self.work_dir is None:
            raise ModelLoadError("a streamed model changed weights but has no work directory to write them to")
        start = time.perf_counter()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / f"block-{k:05d}.safetensors"
        tensors = {n: self.params[n].data for n in self.block_params[k]}
        save_tensors(tensors, path)
        self.overlay[k] = path
        self.counters.overlay_writes += 1
        self.counters.bytes_written += sum(t.nbytes for t in tensors.values())
        self.counters.write_seconds += time.perf_counter() - start

    def evict_all(self) -> None:
        for k in list(self.resident):
            self.evict(k)

    # -- reading without residency -----------------------------------------------------------------
    def block_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Block k's current weights by parameter name (resident, overlay or checkpoint), not made resident."""
        names = self.block_params[k]
        if k in self.resident:
            return {n: self.params[n].data for n in names}
        return self._read({n: self.ckpt_key[n] for n in names}, self.overlay.get(k))

    def source_tensor(self, name: str) -> torch.Tensor:
        """A parameter's checkpoint value in the compute dtype (outer ones are resident)."""
        if name in self.outer_params:
            return self.params[name].data
        return load_tensors(self.index, [self.ckpt_key[name]], self.dtype)[self.ckpt_key[name]]

    def block_bytes(self) -> int:
        return max((self.index.nbytes(self.dtype, [self.ckpt_key[n] for n in names]) for names in self.block_params), default=0)

    def outer_bytes(self) -> int:
        return self.index.nbytes(self.dtype, [self.ckpt_key[n] for n in self.outer_params])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
