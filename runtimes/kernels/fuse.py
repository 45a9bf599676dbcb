"""One packed op for sibling Linears that read the same input: q/k/v of an attention block, gate/up of
a gated MLP (docs/kernels.md, host overhead at batch 1).

At batch 1 a small model's decode step is ~210 Linear calls, and each call's fixed cost (dispatcher,
activation quantization, output allocation, Python module call) is a large share of a 576-wide
layer's time. Concatenating the rows of q, k and v (gate and up) into one packed weight makes one call
read the input, quantize it once and stream all three weights; the outputs are split as views.

The packed arrays are concatenated at load time, tile by tile (`concat_packed`): the on-disk format
keeps one packed layer per HF Linear, nothing dense is built, and numerics are identical (each row's
computation does not depend on its neighbours). The HF modules keep calling `q_proj(x)`,
`k_proj(x)`, `v_proj(x)`: each becomes a `FusedMember`; the first call computes the fused op and keeps
the other members' outputs for the same input tensor (the same object, held until every member took
its output, and the same version where torch tracks one), which the next calls take. A member called
with another input recomputes, so the result is always the same as unfused. `SPARSEC_FUSE=0` turns
fusion off (the A/B of docs/kernels.md).
"""

from __future__ import annotations

import torch
from torch import nn

from runtimes.kernels.format import DENSE_KINDS, FIELDS, PAD, TILE, PackedLinear
from runtimes.kernels.modules import PackedLinearModule

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def concat_packed(parts: list[PackedLinear]) -> PackedLinear | None:
    """The rows of `parts` stacked into one packed weight, or None when they cannot be (different kinds
    or input sizes, or a sparse part whose rows do not fill whole tiles)."""
    first = parts[0]
    kind, k = first.kind, first.in_features
    if any(p.kind != kind or p.in_features != k for p in parts):
        return None
    sparse = kind not in DENSE_KINDS
    if sparse and any(p.out_features % TILE for p in parts):
        return None
    tensors: dict[str, torch.Tensor] = {}
    for f in FIELDS[kind]:
        if f == "tile_ptr":
            ptrs, offset = [], 0
            for p in parts:
                tp = p.tensors["tile_ptr"]
                ptrs.append(tp[:-1] + offset)
                offset += int(tp[-1])
            tensors[f] = torch.cat([*ptrs, torch.tensor([offset], dtype=torch.int64)])
        elif f == "values":
            vals = [p.tensors["values"][: int(p.tensors["tile_ptr"][-1])] for p in parts]
            tensors[f] = torch.cat([*vals, torch.zeros(PAD[kind], dtype=vals[0].dtype)])
        else:
            tensors[f] = torch.cat([p.tensors[f] for p in parts])
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts])
    return PackedLinear(kind, sum(p.out_features for p in parts), k, tensors, bias)


class FusedPackedLinear(nn.Module):
    """One packed op over the concatenated rows of its members; `take(i, x)` is member i's output."""

    def __init__(self, packed: PackedLinear, sizes: list[int]):
        super().__init__()
        self.inner = PackedLinearModule(packed)
        self.sizes = sizes
        self._x: torch.Tensor | None = None
        self._version = -1
        self._outs: list[torch.Tensor | None] = []

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        version = _version(x)
        if x is not self._x or version != self._version or self._outs[index] is None:
            self._outs = [o.contiguous() for o in torch.split(self.inner(x), self.sizes, dim=-1)]
            self._x, self._version = x, version
        out = self._outs[index]
        self._outs[index] = None  # each member takes its output once; then the input is computed again
        if all(o is None for o in self._outs):
            self._x = None  # nothing left to hand out: release the input
        return out


def _version(x: torch.Tensor) -> int:
    """x's in-place version counter; inference tensors have none (and cannot be modified in place outside
    inference mode, where HF's forward runs them). Checked with is_inference(), not by catching the
    error: building torch's exception (with its C++ backtrace) cost more than the fused op saved."""
    return -1 if x.is_inference() else x._version


class FusedMember(nn.Module):
    """Stands where one of the fused Linears was: same in/out features, kind and call counter."""

    def __init__(self, fused: FusedPackedLinear, index: int, kind: str, in_features: int, out_features: int):
        super().__init__()
        self.fused = [fused]  # a list: not registered as a child, so the weights are counted once
        self.index = index
        self.kind = kind
        self.in_features = in_features
        self.out_features = out_features
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fused[0].take(self.index, x)

    def kernel(self) -> PackedLinearModule:
        return self.fused[0].inner

    def extra_repr(self) -> str:
        return f"fused member {self.index}, kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"


def fusion_enabled() -> bool:
    import os

    return os.environ.get("SPARSEC_FUSE", "1") != "0"


def fuse_groups(packed_layers: dict[str, PackedLinear]) -> list[tuple[list[str], PackedLinear]]:
    """(member names, fused packed weight) for every complete sibling group in `packed_layers`."""
    out = []
    for name in packed_layers:
        parent, _, child = name.rpartition(".")
        for group in GROUPS:
            if child != group[0]:
                continue
            names = [f"{parent}.{c}" if parent else c for c in group]
            if all(n in packed_layers for n in names):
                fused = concat_packed([packed_layers[n] for n in names])
                if fused is not None:
                    out.append((names, fused))
    return out
