"""Statistics of a model's layers that both passes and lowering need, and the hook helpers they use.

One core module so that a pass (e.g. `quantize`, which screens layers for static int8) and lowering
(which screens them again for the variants it writes) read the same numbers, and neither imports
the other: passes and lowering both sit above the core, never beside each other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compiler.ir import ModelIR, PrunableLayer
from compiler.trace import call_model

STATIC_MAX_ACTIVATION_RATIO = 45.0  # static int8 keeps layers fp32 above this input max|x|/rms


def input_matrix(layer: PrunableLayer, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(tokens, in_features) view of a layer input, matching `weight_matrix` columns."""
    if layer.kind == "conv2d":
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: `logits`, else `last_hidden_state`, else the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    return out[0]


def activation_ratios(ir: ModelIR, names: list[str], samples: list[dict[str, Any]]) -> dict[str, float]:
    """max|x| / rms(x) of each layer's input over all calibration tokens (one forward per sample).
    Static int8 fixes the activation range at calibration: a large ratio means either clipped
    outliers or all 256 levels spent on them."""
    acc = {n: [0.0, 0.0, 0] for n in names}  # max |x|, sum x², count

    def hook(inputs: tuple, name: str) -> None:
        x = inputs[0].detach().float()
        a = acc[name]
        a[0] = max(a[0], float(x.abs().max()))
        a[1] += float((x * x).sum())
        a[2] += x.numel()

    handles = [ir.get_module(n).register_forward_hook(lambda m, i, o, n=n: hook(i, n)) for n in names]
    try:
        with torch.no_grad():
            for sample in samples:
                call_model(ir.module, sample)
    finally:
        for h in handles:
            h.remove()
    return {n: (mx / (ss / c) ** 0.5 if c and ss > 0 else 0.0) for n, (mx, ss, c) in acc.items()}
