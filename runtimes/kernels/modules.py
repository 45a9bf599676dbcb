"""nn.Modules that run a PackedLinear through the sparsec ops (what the torch host swaps in)."""

from __future__ import annotations

import torch
from torch import nn

from runtimes.kernels.format import PackedLinear
from runtimes.kernels.ops import ops


class PackedLinearModule(nn.Module):
    """y = x W^T + b with W held packed (sparse / dense int8, sparse / dense int4, sparse fp32) as buffers.

    int8 and int4 kinds quantize each token's activations dynamically (symmetric int8, per token) inside
    the op.
    Inputs of other dtypes are computed in fp32 and cast back.
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
        self._ops = ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.to(torch.float32)
        o, n = self._ops, self.out_features
        if self.kind == "sparse-int8":
            y = o.sparse_linear_i8(x, self.masks, self.tile_ptr, self.values, self.scales, self.rowsum, self.bias, n)
        elif self.kind == "sparse-fp32":
            y = o.sparse_linear_f32(x, self.masks, self.tile_ptr, self.values, self.bias, n)
        elif self.kind == "sparse-int4":
            y = o.sparse_linear_i4(x, self.masks, self.tile_ptr, self.values, self.scales, self.comp, self.bias, n)
        elif self.kind == "dense-int4":
            y = o.dense_linear_i4(x, self.q, self.scales, self.comp, self.bias, n)
        else:
            y = o.dense_linear_i8(x, self.q, self.scales, self.rowsum, self.bias, n)
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"
