"""The lean decoder host: a Llama-family causal LM's forward written as ~8 op calls per block, on the
sparsec kernels, with an in-place KV cache — instead of Hugging Face's eager modules.

Why (docs/kernels.md, "The lean decoder host"): on SmolLM2-135M a decode step through transformers'
eager modules is ~5,100 torch op calls, of which 224 are ours; the rest (attention, RMSNorm as
`pow`/`mean`/`rsqrt`/`mul`, rotary as slices and `cat`, the DynamicCache's `cat`) cost as much as our
kernels' work, and onnxruntime's fused graph (415 nodes) out-ran our sparse kernels on that host. Here a
block is: `add_rms_norm` (residual add + RMSNorm, one op), the fused q/k/v projection, `rope_attention`
(rotary, in-place cache write and grouped-query attention over each row's own prefix, one op), o_proj,
`add_rms_norm`, the fused gate/up projection, `silu_mul`, down_proj — each projection whatever the host
model holds: a packed layer (one call to its kernel, q/k/v and gate/up as the fused op of
runtimes/kernels/fuse.py) or a torch Linear (q/k/v and gate/up concatenated once at load: the dense fp32
reference runs the same code with torch's GEMM).

Which models: those `compiler.lowering.gqa.gqa_layout` accepts (Llama, Mistral without an active sliding
window, Qwen2; RMSNorm, SiLU gated MLP, a fixed rotary table) — the same rule as onnxruntime's fused
graph, with packed layers counted as projections. Others keep the Hugging Face host (`lean_layout`
returns the reason). `SPARSEC_HOST=hf` forces the Hugging Face host (the A/B of docs/kernels.md).

The cache (`LeanCache`, the generation loop's `Cache` protocol): one fp32 buffer per layer and K/V,
(rows, kv_heads, capacity, head_dim), written in place; each prompt is prefilled alone, unpadded, into
its row (positions count from its first token), then every row decodes together, each at its own length;
finished rows leave by compaction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from runtimes.kernels.ops import ops

Project = Callable[[torch.Tensor], torch.Tensor]


def host_choice() -> str:
    """`SPARSEC_HOST`: "auto" (lean where the model allows it) or "hf" (always Hugging Face's modules)."""
    value = os.environ.get("SPARSEC_HOST", "auto") or "auto"
    if value not in ("auto", "hf"):
        raise ValueError(f"error: SPARSEC_HOST must be 'auto' or 'hf', got '{value}'")
    return value


@dataclass
class LeanBlock:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: Project
    o: Project
    gate_up: Project
    down: Project


def _projection(modules: list[nn.Module]) -> Project:
    """x -> concatenated outputs of `modules` (sibling projections reading the same input), in one call
    where the host model allows it."""
    from runtimes.kernels.fuse import FusedMember
    from runtimes.kernels.modules import PackedLinearModule

    first = modules[0]
    if isinstance(first, FusedMember):
        fused = first.fused[0]
        if len(fused.sizes) == len(modules) and all(
                isinstance(m, FusedMember) and m.fused[0] is fused and m.index == i for i, m in enumerate(modules)):
            return fused.inner.forward  # one packed op over the concatenated rows
    if all(isinstance(m, nn.Linear) for m in modules):
        weight = torch.cat([m.weight.detach() for m in modules]).contiguous()
        if len(modules) > 1:  # the modules keep views of the concatenated weight: one copy in memory, not two
            offset = 0
            for m in modules:
                m.weight.data = weight[offset:offset + m.out_features]
                offset += m.out_features
        biases = [m.bias for m in modules]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, modules)])
        return lambda x: F.linear(x, weight, bias)
    if len(modules) == 1 and isinstance(first, PackedLinearModule):
        return first.forward
    calls = [m.forward if isinstance(m, PackedLinearModule) else m for m in modules]
    return lambda x: torch.cat([c(x) for c in calls], dim=-1)


def lean_layout(model: nn.Module) -> Any:
    """The model's layout for the lean host, or a one-line reason it has none."""
    from compiler.lowering.gqa import gqa_layout
    from runtimes.kernels.fuse import FusedMember
    from runtimes.kernels.modules import PackedLinearModule

    return gqa_layout(model, (nn.Linear, PackedLinearModule, FusedMember))


class LeanDecoderModel:
    """The host model's weights arranged for the lean forward (see the module docstring)."""

    def __init__(self, model: nn.Module, layout: Any):
        self.layout = layout
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()
        self.blocks = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.blocks.append(LeanBlock(
                layer.input_layernorm.weight.detach().float().contiguous(),
                layer.post_attention_layernorm.weight.detach().float().contiguous(),
                float(layer.input_layernorm.variance_epsilon),
                _projection([attn.q_proj, attn.k_proj, attn.v_proj]), _projection([attn.o_proj]),
                _projection([mlp.gate_proj, mlp.up_proj]), _projection([mlp.down_proj])))
        self.final_norm = inner.norm.weight.detach().float().contiguous()
        self.final_eps = float(inner.norm.variance_epsilon)
        self.head = _projection([model.lm_head])
        self.cos, self.sin = layout.cos.contiguous(), layout.sin.contiguous()
        self.ops = ops()

    def new_cache(self, rows: int, capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lay = self.layout
        shape = (rows, lay.kv_heads, capacity, lay.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, starts: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]],
                last_only: bool = True) -> torch.Tensor:
        """Logits of `ids` (rows, tokens) whose token t of row b sits at position starts[b] + t; the new keys
        and values are written into `cache` (each (rows, kv_heads, capacity, head_dim)). Last token only by
        default: (rows, vocab); else (rows, tokens, vocab)."""
        o, lay = self.ops, self.layout
        x = F.embedding(ids, self.embed).contiguous()
        delta = None
        for block, (ck, cv) in zip(self.blocks, cache):
            h = o.add_rms_norm(x, delta, block.in_norm, block.eps)
            a = o.rope_attention(block.qkv(h), ck, cv, starts, self.cos, self.sin, lay.heads, lay.kv_heads, lay.scale)
            h = o.add_rms_norm(x, block.o(a), block.post_norm, block.eps)
            delta = block.down(o.silu_mul(block.gate_up(h)))
        h = o.add_rms_norm(x, delta, self.final_norm, self.final_eps)
        if last_only:
            h = h[:, -1, :].contiguous()
        return self.head(h)


class LeanCache:
    """`runtimes.decode.loop.Cache` on the lean host (see the module docstring)."""

    def __init__(self, lean: LeanDecoderModel, prompts: list[np.ndarray], capacity: int):
        self.lean = lean
        self.prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        self.lengths = [len(p) for p in self.prompts]
        self.cache = lean.new_cache(len(prompts), capacity)

    def row_logits(self, row: int, last_only: bool = True) -> torch.Tensor:
        """Prefill one prompt alone into its row of the cache."""
        views = [(k[row:row + 1], v[row:row + 1]) for k, v in self.cache]
        ids = torch.from_numpy(self.prompts[row])[None, :]
        return self.lean.forward(ids, torch.zeros(1, dtype=torch.int64), views, last_only)[0]

    def prefill(self) -> np.ndarray:
        return torch.stack([self.row_logits(r) for r in range(len(self.prompts))]).float().numpy()

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray:
        if len(keep_rows) != len(self.lengths):  # finished requests leave the batch: compact the cache
            index = torch.tensor(keep_rows, dtype=torch.int64)
            self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]
            self.lengths = [self.lengths[r] for r in keep_rows]
        starts = torch.tensor(self.lengths, dtype=torch.int64)
        ids = torch.tensor(tokens, dtype=torch.int64)[:, None]
        logits = self.lean.forward(ids, starts, self.cache)
        self.lengths = [n + 1 for n in self.lengths]
        return logits.float().numpy()


def lean_host(host: Any) -> tuple[LeanDecoderModel | None, str]:
    """The lean forward of a HostModel (runtimes/kernels/torch_host.py), or None and the one-line reason the
    Hugging Face modules run it instead."""
    if not host.causal:
        return None, "an encoder"
    if host_choice() == "hf":
        return None, "SPARSEC_HOST=hf"
    layout = lean_layout(host.model)
    if isinstance(layout, str):
        return None, layout
    return LeanDecoderModel(host.model, layout), ""


def lean_logits(lean: LeanDecoderModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(rows, width, vocab) logits of a batch of (left-)padded prompts: unpadded rows in one call, a row with
    padding run alone on its valid tokens (zeros at its padded positions)."""
    valid = mask.astype(bool)
    if valid.all():
        cache = lean.new_cache(ids.shape[0], ids.shape[1])
        starts = torch.zeros(ids.shape[0], dtype=torch.int64)
        return lean.forward(torch.from_numpy(ids.astype(np.int64)), starts, cache, last_only=False).float().numpy()
    prompts = [row[m] for row, m in zip(ids, valid)]
    cache = LeanCache(lean, prompts, max(1, int(valid.sum(1).max())))
    out: np.ndarray | None = None
    for r in range(len(prompts)):
        logits = cache.row_logits(r, last_only=False).float().numpy()
        if out is None:
            out = np.zeros((*ids.shape, logits.shape[-1]), dtype=np.float32)
        out[r, valid[r]] = logits
    assert out is not None
    return out
