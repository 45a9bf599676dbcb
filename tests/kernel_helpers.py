"""Helpers shared by the kernel tests (int8/fp32 and int4): random weights with the sparsity patterns the
kernels must handle, and the dispatch paths this CPU offers (each test module parametrizes its `isa` fixture
over them)."""

from __future__ import annotations

import torch

from runtimes.kernels import ops

ISAS = ops.available_isas()
SHAPES = [(1, 64), (37, 100), (64, 129), (130, 1000), (96, 576)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def sparse_weight(n: int, k: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0.0
    if n > 3:
        w[1] = 0.0  # an all-zero row at every sparsity
        w[n // 2, : k // 2] = 0.0
    return w
