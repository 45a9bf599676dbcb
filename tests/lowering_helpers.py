"""Helpers shared by the lowering / quantization / backend / verification tests."""

from __future__ import annotations


def prune_half(ir) -> None:
    """Magnitude-prune every prunable layer to 50% in place (zeros to look for in the ONNX)."""
    for name in ir.layers:
        w = ir.weight(name).clone()
        w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
        ir.set_weight(name, w)
