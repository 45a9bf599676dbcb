"""nn.Modules that run a PackedLinear through the sparsec ops (what the torch host swaps in)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from runtimes.kernels.format import PackedLinear
from runtimes.kernels.ops import ops


def packed_call(kind: str, t: dict[str, torch.Tensor], bias: torch.Tensor | None, n: int) -> Callable:
    """x -> y for one packed weight: the op's overload bound to its arrays once, so a call at batch 1
    costs one dispatcher hop and no Python branching (docs/kernels.md, host overhead)."""
    o = ops()
    if kind == "sparse-int8":
        f = o.sparse_linear_i8.default
        return lambda x: f(x, t["masks"], t["tile_ptr"], t["values"], t["scales"], t["rowsum"], bias, n)
    if kind == "sparse-fp32":
        f = o.sparse_linear_f32.default
        return lambda x: f(x, t["masks"], t["tile_ptr"], t["values"], bias, n)
    if kind == "sparse-int4":
        f = o.sparse_linear_i4.default
        return lambda x: f(x, t["masks"], t["tile_ptr"], t["values"], t["scales"], t["zeros"], t["comp"], bias, n)
    if kind == "dense-int4":
        f = o.dense_linear_i4.default
        return lambda x: f(x, t["q"], t["scales"], t["zeros"], t["comp"], bias, n)
    if kind == "sparse-bf16":
        f = o.sparse_linear_bf16.default
        return lambda x: f(x, t["masks"], t["tile_ptr"], t["values"], bias, n)
    if kind == "dense-bf16":
        f = o.dense_linear_bf16.default
        return lambda x: f(x, t["q"], bias, n)
    if kind == "dense-int8":
        f = o.dense_linear_i8.default
        return lambda x: f(x, t["q"], t["scales"], t["rowsum"], bias, n)
    raise ValueError(f"unknown packed kind '{kind}'")


class PackedLinearModule(nn.Module):
    """y = x W^T + b with W held packed (sparse / dense int8, int4 or bf16, sparse fp32) as buffers.

    int8 and int4 kinds quantize each token's activations dynamically (symmetric int8, per token) inside
    the op. Inputs of other dtypes are computed in fp32 and cast back.
    """

    def __init__(self, packed: PackedLinear):
        super().__init__()
        packed.validate()
        self.kind = packed.kind
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        for name, t in packed.tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("bias", packed.bias, persistent=False)
        self.calls = 0  # how many times the packed kernel ran: the "which layers ran sparse" proof
        self._call = packed_call(self.kind, dict(packed.tensors), packed.bias, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.dtype is torch.float32:
            return self._call(x)
        return self._call(x.to(torch.float32)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"
