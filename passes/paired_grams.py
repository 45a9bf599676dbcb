"""Two calibration streams side by side — the dense model's and the sparse model's — block by block,
and per layer the Gram matrices that recovery passes fit on (fit split) and check on (held-out split).

Why two streams: the sparse block should reproduce what the *dense* block computes on *dense* inputs
(its targets), from the inputs it actually receives in the sparse model (errors of earlier blocks
included), so recovery also corrects error accumulated upstream.

Per block: one dense forward over every sample records each layer's dense input X_d. Then, layer group
by layer group in execution order (layers that receive the same input — q/k/v, gate/up — form one
group), the sparse block runs on every sample *up to that group* (the forward stops right after it)
and accumulates G_ss = X_sᵀX_s, G_sd = X_sᵀX_d, G_dd = X_dᵀX_d, separately for the fit and the held-out
samples. The recovery callback then rewrites the group's weights before the next group is measured,
so later layers see the recovered earlier ones. Memory: one block's dense layer inputs, plus three
in×in matrices per split for the layers of one group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from compiler.block_batching import stacked_call
from compiler.block_runner import BlockInputs, BlockRunner
from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import PassContext


class _Stop(Exception):
    pass


@dataclass
class Grams:
    """Gram matrices of one layer on one split (float64, summed over tokens)."""

    ss: torch.Tensor
    sd: torch.Tensor
    dd: torch.Tensor
    tokens: int = 0


@dataclass
class LayerGrams:
    name: str
    fit: Grams
    held: Grams


def dense_reference(ctx: PassContext, pass_name: str) -> ModelIR:
    """The dense model (a copy of the IR before the pipeline ran), provided by the compile driver as
    `ctx.extras["dense"]` (a ModelIR or a callable returning one)."""
    dense = ctx.extras.get("dense")
    if callable(dense):
        dense = dense()
    if dense is None:
        raise SpecError(f"pass '{pass_name}' needs the dense model: run it through `sparsec compile` "
                        "(or put the dense ModelIR in PassContext.extras['dense'])")
    return dense


def split_samples(n: int, holdout: float, pass_name: str) -> list[bool]:
    """is_held[i] for n samples: the last round(n·holdout) samples (at least 1) are held out."""
    if n < 2:
        raise SpecError(f"pass '{pass_name}' needs >= 2 calibration samples (a fit and a held-out split), got {n}")
    held = min(n - 1, max(1, round(n * holdout)))
    return [i >= n - held for i in range(n)]


def _matrix(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.detach().reshape(-1, width).float()


def call_block(module: nn.Module, inputs: BlockInputs, group: list[int]) -> Any:
    """The samples of `group` through one block in one call (the block runner's calling convention)."""
    args, kwargs = stacked_call(inputs.hidden, inputs.args, inputs.kwargs, inputs.hidden_pos, group)
    with torch.no_grad():
        return module(*args, **kwargs)


def input_groups(ir: ModelIR, names: list[str], captured: dict[str, list[torch.Tensor]]) -> list[list[str]]:
    """Consecutive layers (execution order) whose dense inputs are identical form one group."""
    groups: list[list[str]] = []
    for n in names:
        if groups:
            head = groups[-1][0]
            a, b = captured[head][0], captured[n][0]
            if a.shape == b.shape and torch.equal(a, b):
                groups[-1].append(n)
                continue
        groups.append([n])
    return groups


def run_paired(ir: ModelIR, dense: ModelIR, samples: list[dict[str, torch.Tensor]], is_held: list[bool],
               targets: set[str], recover: Callable[[list[LayerGrams]], None],
               progress: Callable[[str, int, int], None], what: str) -> None:
    """Walk both models block by block; call `recover(group_grams)` for each group of target layers."""
    if [b.name for b in dense.blocks] != [b.name for b in ir.blocks] or list(dense.layers) != list(ir.layers):
        raise SpecError(f"pass '{what}': the dense reference does not have the model's structure")
    for layer in (ir.layers[n] for n in targets):
        if layer.kind == "conv2d":
            raise SpecError(f"pass '{what}': layer '{layer.name}' is a Conv2d: recovery supports Linear / Conv1D layers")
    dense_runner = BlockRunner(dense, samples, None, what=what)
    sparse_runner = BlockRunner(ir, samples, progress, what=what)
    for dstep, sstep in zip(dense_runner, sparse_runner):
        names = [n for n in sstep.block.layers if n in targets]
        if not names:
            dstep.outputs()
            continue
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        # a batched block call sees several samples at once: keep one entry per sample
        handles = [dense.get_module(n).register_forward_hook(
            lambda m, inp, out, n=n: captured[n].extend(inp[0].detach().split(1, dim=0))) for n in names]
        try:
            dstep.outputs()
        finally:
            for h in handles:
                h.remove()
        for group in input_groups(ir, names, captured):
            recover(_group_grams(ir, sstep, group, captured, is_held))
            sstep.mark_modified()
        del captured


def _group_grams(ir: ModelIR, sstep: Any, group: list[str], captured: dict[str, list[torch.Tensor]],
                 is_held: list[bool]) -> list[LayerGrams]:
    head = group[0]
    width = ir.layers[head].in_features

    def empty() -> Grams:
        z = lambda: torch.zeros(width, width, dtype=torch.float64)  # noqa: E731
        return Grams(z(), z(), z())

    fit, held = empty(), empty()
    current: dict[str, Any] = {}

    def hook(_m, inp, _out):
        current["x"] = inp[0].detach()
        raise _Stop

    last = ir.get_module(group[-1])
    handle = last.register_forward_hook(hook)
    first = ir.get_module(head)
    h_first = first.register_forward_hook(lambda m, inp, out: current.__setitem__("x", inp[0].detach()))
    batches = sstep.runner.groups or [[i] for i in range(len(sstep.inputs.hidden))]
    try:
        for batch in batches:
            current.clear()
            try:
                call_block(sstep.module, sstep.inputs, batch)
            except _Stop:
                pass
            if "x" not in current:
                raise SpecError(f"layer '{head}' was not called by its block's forward")
            per_sample = current["x"].split(1, dim=0) if len(batch) > 1 else [current["x"]]
            # one float32 product per split and batch, accumulated in float64
            for g, flag in ((fit, False), (held, True)):
                idx = [k for k, i in enumerate(batch) if is_held[i] == flag]
                if not idx:
                    continue
                xs = torch.cat([_matrix(per_sample[k], width) for k in idx])
                xd = torch.cat([_matrix(captured[head][batch[k]], width) for k in idx])
                g.ss += (xs.t() @ xs).double()
                g.sd += (xs.t() @ xd).double()
                g.dd += (xd.t() @ xd).double()
                g.tokens += xs.shape[0]
    finally:
        handle.remove()
        h_first.remove()
    return [LayerGrams(n, fit, held) for n in group]
