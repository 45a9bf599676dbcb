"""Small helpers the sparsity passes share: which layers a pass may touch, and plan summaries."""

from __future__ import annotations

import re
from typing import Any

from compiler.errors import SpecError
from compiler.ir import ModelIR


def require_prunable_layers(ir: ModelIR, pass_name: str) -> None:
    if not ir.layers:
        raise SpecError(f"pass '{pass_name}': the model has no prunable layers (Linear, GPT-2 Conv1D or Conv2d)")


def compile_patterns(patterns: tuple[str, ...], what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise SpecError(f"{what}: invalid regular expression '{p}': {exc}") from None
    return out


def weighted_mean_target(ir: ModelIR, names: list[str]) -> float | None:
    """Parameter-weighted mean of the planned targets of `names` (None when there are none)."""
    total = sum(ir.plan[n].params for n in names)
    if not total:
        return None
    return sum(ir.plan[n].target_sparsity * ir.plan[n].params for n in names) / total


def planned_layers(ir: ModelIR) -> list[str]:
    """Layers with a target sparsity, in execution order."""
    return [n for n in ir.layers if ir.plan[n].target_sparsity is not None]


def layer_groups(ir: ModelIR, names: list[str], granularity: str) -> dict[Any, list[str]]:
    """Layers grouped for an allocation: by block (`granularity="block"`) or one group per layer."""
    groups: dict[Any, list[str]] = {}
    for n in names:
        groups.setdefault(ir.layers[n].block if granularity == "block" else n, []).append(n)
    return groups
