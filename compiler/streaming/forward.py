"""Full-model outputs of a streamed model, computed block-major: every block is read once per chunk of
samples instead of once per sample.

1. the block runner captures block 0's inputs for every sample and runs the blocks in order, one
   call per sample (no batching, so each call has the shapes a per-sample forward has: the results
   are bit-identical to the in-memory forward);
2. the head (final norm, LM head) is replayed per sample: the model's forward runs once more with
   every block's `forward` replaced by "return this sample's final hidden state", so whatever the
   architecture does after its blocks runs as written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from compiler.block_runner import BlockInputs, BlockRunner
from compiler.streaming.streamed_ir import StreamedIR
from compiler.trace import call_model


class PerSampleRunner(BlockRunner):
    """The block runner with one block call per sample (the shapes of a per-sample forward)."""

    def check_batching(self, inputs: BlockInputs) -> None:
        self.groups = None


def streamed_outputs(ir: StreamedIR, samples: list[dict[str, torch.Tensor]]) -> Iterator[Any]:
    """The model's output for each sample, in order (block-major over all of `samples`). A model without
    a repeated container has nothing streamed (it is resident whole): plain forwards."""
    if not ir.residency.block_names:
        for sample in samples:
            yield call_model(ir.module, sample)
        return
    last_block = ir.module.get_submodule(ir.blocks[-1].name)
    form: dict[str, Any] = {}

    def record(_m: Any, _a: Any, out: Any) -> None:
        form["tuple"] = isinstance(out, tuple)

    handle = last_block.register_forward_hook(record)
    try:
        last = None
        for step in PerSampleRunner(ir, samples, what="streamed forward"):
            last = step  # only the last step is kept: each holds its block's outputs
        assert last is not None
        finals = last.outputs()
    finally:
        handle.remove()
    yield from replay_head(ir, samples, finals, bool(form.get("tuple")))


def replay_head(ir: StreamedIR, samples: list[dict[str, torch.Tensor]], finals: list[torch.Tensor],
                as_tuple: bool) -> Iterator[Any]:
    mods = [ir.module.get_submodule(b.name) for b in ir.blocks]
    res = ir.residency
    res.suspended = True
    try:
        for sample, final in zip(samples, finals):
            value = (final,) if as_tuple else final
            for m in mods:
                m.forward = lambda *_a, _v=value, **_kw: _v
            yield call_model(ir.module, sample)
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)
        res.suspended = False


def window_chunks(n: int, seqlen: int, batch_tokens: int | None) -> int:
    """Windows per block-major chunk: each chunk reads every block once."""
    return max(1, (batch_tokens or 16384) // max(seqlen, 1)) if n else 1
