"""Sequential, memory-bounded calibration through the model, one block at a time.

The runner captures the inputs of block 0 (a pre-hook that stops the forward pass there), then for
each block k yields a `BlockStep`. A pass may collect per-layer input statistics of that block
(`step.layer_stats(...)`) and change the block's weights; the runner then computes the block's
outputs with its *current* (possibly pruned) weights and feeds them to block k+1, as the Wanda and
SparseGPT reference code does. Only one block's activations (samples x seqlen x hidden) are held;
the per-sample keyword arguments (attention masks, rotary embeddings) are captured once and reused.
Blocks are touched only through `ir.block_module(block)`, so they can be streamed from disk: with a
StreamedIR (compiler/streaming) the block of each step is loaded when reached and evicted (written
back if changed) when the next one is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from compiler.block_batching import DEFAULT_MAX_TOKENS, batch_groups, stacked_call
from compiler.errors import NumericsError
from compiler.ir import Block, ModelIR, PrunableLayer, weight_matrix
from compiler.stats import input_matrix
from compiler.trace import call_model


class _StopForward(Exception):
    pass


@dataclass
class LayerStats:
    """Input statistics of one prunable layer over all calibration tokens.

    `sq_norm[j]` = sum over tokens of x_j^2 (Wanda's ||X_j||^2); `hessian` = 2/n * X X^T (SparseGPT),
    accumulated in float64-free running form exactly as the reference implementation does."""

    sq_norm: torch.Tensor
    tokens: int = 0
    hessian: torch.Tensor | None = None

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_norm.sqrt()


@dataclass
class BlockInputs:
    """Captured inputs of the current block, one entry per calibration sample."""

    hidden: list[torch.Tensor]
    args: list[tuple]  # positional args with the hidden state slot set to None
    kwargs: list[dict[str, Any]]
    hidden_pos: int | str  # index into args, or the kwarg name


@dataclass
class BlockStep:
    runner: "BlockRunner"
    block: Block
    module: nn.Module
    inputs: BlockInputs
    modified: bool = False
    _outputs: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def layers(self) -> list[PrunableLayer]:
        return self.runner.ir.block_layers(self.block)

    def mark_modified(self) -> None:
        self.modified = True

    def layer_stats(self, hessian: bool = False, layers: list[str] | None = None) -> dict[str, LayerStats]:
        """Run the block over all samples with hooks on its layers; returns stats per layer name.

        Layers fed the very same input tensor (a Llama block's q/k/v projections, gate/up) share one
        `LayerStats` object: their statistics are identical by definition, so the Hessian (an in×in
        matrix product per sample) is accumulated once per distinct input, not once per layer. Sharing
        is decided on the first sample (the hook of a layer sees the tensor object the previous hook saw)
        and checked on every later one."""
        ir = self.runner.ir
        names = layers if layers is not None else list(self.block.layers)
        stats: dict[str, LayerStats] = {}
        owner: dict[str, str] = {}  # layer -> the layer whose stats it shares
        last: dict[str, Any] = {"x": None, "name": None}
        handles = []
        for name in names:
            layer = ir.layers[name]
            mod = ir.get_module(name)
            stats[name] = LayerStats(sq_norm=torch.zeros(layer.in_features, dtype=torch.float32),
                                     hessian=torch.zeros(layer.in_features, layer.in_features) if hessian else None)

            def hook(m, inp, _out, name=name, layer=layer):
                same = inp[0] is last["x"] and ir.layers[last["name"]].in_features == layer.in_features \
                    and type(ir.get_module(last["name"])) is type(m)
                first = stats[name].tokens == 0 and name not in owner
                if first and same:
                    owner[name] = owner.get(last["name"], last["name"])
                if name in owner:
                    if not same or owner.get(last["name"], last["name"]) != owner[name]:
                        raise NumericsError(f"layer '{name}' shared its input with '{owner[name]}' on the first "
                                            f"calibration sample but not on a later one")
                    return
                last["x"], last["name"] = inp[0], name
                x = inp[0].detach().float()
                if not torch.isfinite(x).all():
                    raise NumericsError(f"NaN/Inf in the calibration activations entering layer '{name}'")
                xm = input_matrix(layer, m, x)
                st = stats[name]
                n_new = xm.shape[0]
                st.sq_norm += (xm * xm).sum(0)
                if st.hessian is not None:
                    total = st.tokens + n_new
                    st.hessian *= st.tokens / total
                    scaled = xm * (2.0 / total) ** 0.5
                    st.hessian += scaled.t() @ scaled
                st.tokens += n_new

            handles.append(mod.register_forward_hook(hook))
        try:
            outputs = self._forward_all()
        finally:
            for h in handles:
                h.remove()
            last["x"] = None
        for name, source in owner.items():
            stats[name] = stats[source]
        if not self.modified:
            self._outputs = outputs
        return stats

    def _forward_all(self) -> list[torch.Tensor]:
        return self.runner.forward_samples(self.module, self.inputs)

    def outputs(self) -> list[torch.Tensor]:
        """Block outputs with the current weights (cached when the weights did not change)."""
        if self._outputs is None or self.modified:
            self._outputs = self._forward_all()
            self.modified = False
        return self._outputs


class BlockRunner:
    """Iterate over `ir.blocks` with calibration activations flowing through the current weights."""

    def __init__(self, ir: ModelIR, samples: list[dict[str, torch.Tensor]],
                 progress: Callable[[str, int, int], None] | None = None, what: str = "blocks"):
        if not samples:
            raise NumericsError("no calibration samples to run")
        self.ir = ir
        self.samples = samples
        self.progress = progress or (lambda what, done, total: None)
        self.what = what
        # tokens per block call (compiler/block_batching.py); a streamed IR under --max-memory sets fewer
        self.max_batch_tokens = getattr(ir, "batch_tokens", None) or DEFAULT_MAX_TOKENS
        self.groups: list[list[int]] | None = None  # set by check_batching; None = one call per sample

    def capture_first_inputs(self) -> BlockInputs:
        first = self.ir.block_module(self.ir.blocks[0])
        captured: list[tuple[tuple, dict]] = []

        def pre_hook(_m, args, kwargs):
            captured.append((args, kwargs))
            raise _StopForward

        handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for sample in self.samples:
                    try:
                        call_model(self.ir.module, sample)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        if len(captured) != len(self.samples):
            raise NumericsError(f"block '{self.ir.blocks[0].name}' was not reached by the forward pass")
        args0, kwargs0 = captured[0]
        if args0:
            pos: int | str = 0
        elif "hidden_states" in kwargs0:
            pos = "hidden_states"
        else:
            key = next((k for k, v in kwargs0.items() if isinstance(v, torch.Tensor)), None)
            if key is None:
                raise NumericsError(f"cannot find the hidden-state input of block '{self.ir.blocks[0].name}'")
            pos = key
        hidden, args, kwargs = [], [], []
        for a, kw in captured:
            kw = dict(kw)
            if isinstance(pos, int):
                hidden.append(a[0])
                args.append((None,) + tuple(a[1:]))
            else:
                hidden.append(kw.pop(pos))
                args.append(tuple(a))
            kwargs.append(kw)
        return BlockInputs(hidden, args, kwargs, pos)

    def check_batching(self, inputs: BlockInputs) -> None:
        """Group samples for batched block calls, and keep the grouping only when one batched call of
        block 0 reproduces its per-sample calls (a block that does not broadcast its batch-1 arguments
        over the batch falls back to per-sample calls)."""
        groups = batch_groups(inputs.hidden, inputs.args, inputs.kwargs, self.max_batch_tokens)
        self.groups = None
        big = next((g for g in groups if len(g) > 1), None)
        if big is None:
            return
        module = self.ir.block_module(self.ir.blocks[0])
        probe = big[:2]
        try:
            batched = self._call(module, *stacked_call(inputs.hidden, inputs.args, inputs.kwargs, inputs.hidden_pos, probe))
        except Exception:  # noqa: BLE001 - any failure of the batched form means: do not batch
            return
        singles = [self._run_block(module, inputs, i) for i in probe]
        if batched.shape[0] != len(probe) or any(
                batched[k : k + 1].shape != s.shape or not torch.allclose(batched[k : k + 1], s, rtol=1e-4, atol=1e-4 * float(s.abs().max() + 1e-6))
                for k, s in enumerate(singles)):
            return
        self.groups = groups

    def forward_samples(self, module: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
        """The block's output for every sample, batched where `check_batching` allowed it."""
        if self.groups is None:
            return [self._run_block(module, inputs, i) for i in range(len(inputs.hidden))]
        outs: list[torch.Tensor] = []
        for group in self.groups:
            out = self._call(module, *stacked_call(inputs.hidden, inputs.args, inputs.kwargs, inputs.hidden_pos, group))
            outs.extend(out.split(1, dim=0) if len(group) > 1 else [out])
        return outs

    def _run_block(self, module: nn.Module, inputs: BlockInputs, i: int) -> torch.Tensor:
        args, kwargs = list(inputs.args[i]), dict(inputs.kwargs[i])
        if isinstance(inputs.hidden_pos, int):
            args[0] = inputs.hidden[i]
        else:
            kwargs[inputs.hidden_pos] = inputs.hidden[i]
        return self._call(module, args, kwargs)

    def _call(self, module: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            out = module(*args, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        elif hasattr(out, "logits"):
            out = out.logits
        if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
            raise NumericsError(f"NaN/Inf in the outputs of block '{self.ir.blocks[0].name}'")
        return out

    def __iter__(self) -> Iterator[BlockStep]:
        inputs = self.capture_first_inputs()
        self.check_batching(inputs)
        total = len(self.ir.blocks)
        for k, block in enumerate(self.ir.blocks):
            step = BlockStep(self, block, self.ir.block_module(block), inputs)
            yield step
            self.progress(self.what, k + 1, total)
            if k + 1 < total:
                inputs = BlockInputs(step.outputs(), inputs.args, inputs.kwargs, inputs.hidden_pos)


def check_weights_finite(ir: ModelIR, names: list[str] | None = None) -> None:
    for name in names or list(ir.layers):
        w = weight_matrix(ir.get_module(name), ir.layers[name].kind)
        if not torch.isfinite(w).all():
            raise NumericsError(f"NaN/Inf in the weights of layer '{name}'")
