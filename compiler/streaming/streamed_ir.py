"""`StreamedIR`: the ModelIR of a model whose blocks live on disk (compiler/streaming/residency.py).

Passes see the usual IR: `get_module`, `weight`, `set_weight` and full forwards of `module` work as
in memory, because reaching into a block makes it resident (and evicts the previous one). What
differs is cost, not results: a pass that walks every layer's weights reads the model once from
disk. `refresh_measured_sparsity` reads no weights: zero counts are taken whenever a block is loaded
or evicted, the only moments its weights can have changed.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from compiler.ir import ModelIR
from compiler.streaming.residency import Residency

STREAM_ATTR = "sparsec_streamed_ir"  # set on the module, so evaluation finds the IR of a streamed module


@dataclass
class StreamedIR(ModelIR):
    stream: Residency | None = None
    batch_tokens: int | None = None  # tokens per block call (from --max-memory); None: the runner's default
    info: dict[str, Any] | None = None  # mode decision and estimates (for the report)
    # builds a fresh StreamedIR over the same checkpoint from this one (runner.open_streamed; set by it)
    reopen: Callable[["StreamedIR"], "StreamedIR"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self.module, STREAM_ATTR, self)

    @property
    def residency(self) -> Residency:
        assert self.stream is not None
        return self.stream

    def get_module(self, name: str) -> nn.Module:
        k = self.residency.block_of(name)
        if k is not None:
            self.residency.acquire(k)
        return super().get_module(name)

    def set_weight(self, name: str, matrix: torch.Tensor) -> None:
        super().set_weight(name, matrix)
        k = self.residency.block_of(name)
        if k is not None:
            self.residency.mark_dirty(k)

    def refresh_measured_sparsity(self) -> None:
        res = self.residency
        for k in list(res.resident):
            res.count_zeros(k)  # the others were counted when evicted (the only time they can have changed)
        for name in self.layers:
            weight_name = f"{name}.weight"
            if weight_name in res.zeros:
                zeros, numel = res.zeros[weight_name]
            else:
                w = self.weight(name)
                zeros, numel = int((w == 0).sum()), w.numel()
            self.plan[name].measured_sparsity = float(zeros) / max(numel, 1)

    def weights_sha256(self) -> str:
        """`compiler.ir.state_dict_sha256` of the checkpoint as the in-memory mode would load it
        (same keys, compute dtype), computed one tensor at a time."""
        h = hashlib.sha256()
        res = self.residency
        state = self.module.state_dict(keep_vars=True)
        canonical = {alias: name for name, aliases in res.aliases.items() for alias in aliases}
        for key in sorted(state):
            t = res.source_tensor(canonical[key]) if key in canonical else state[key].detach()
            h.update(key.encode())
            t = t.cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def clone(self) -> "StreamedIR":
        """A dense copy: a fresh meta model over the same checkpoint (no overlay); plan and analyses copied."""
        assert self.reopen is not None, "a StreamedIR is built by compiler.streaming.runner"
        new = self.reopen(self)
        new.plan = {k: copy.copy(v) for k, v in self.plan.items()}
        new.analyses = copy.deepcopy(self.analyses)
        new.batch_tokens, new.info = self.batch_tokens, self.info
        return new

    def close(self) -> None:
        """Remove hooks and the overlay directory (after the artifact took the shards it needed)."""
        res = self.residency
        res.close()
        if res.work_dir is not None:
            shutil.rmtree(res.work_dir, ignore_errors=True)


def streamed_ir_of(module: Any) -> StreamedIR | None:
    ir = getattr(module, STREAM_ATTR, None)
    return ir if isinstance(ir, StreamedIR) else None


def is_streamed(ir: Any) -> bool:
    return isinstance(ir, StreamedIR)
