"""The fused decode graph of a Llama-family causal LM: onnxruntime's GroupQueryAttention (rotary inside,
KV cache updatable in place) and SkipSimplifiedLayerNormalization, written beside each graph the
onnxruntime backend runs, as `decode_gqa.onnx` — the graph form onnxruntime-genai builds.

Why (issue 13): the portable graph (`model.onnx`, compiler/lowering/export.py) spells attention, rotary
embeddings, masks and RMSNorm out of plain ONNX ops so that every runtime (DeepSparse, OpenVINO,
TensorRT) loads it. After onnxruntime's own fusions (its `optimized_model_filepath` at ENABLE_EXTENDED)
SmolLM2-135M still holds 2,934 nodes per call
(Unsqueeze/Gather/Concat/Reshape/Slice shape arithmetic, rotary, mask building); onnxruntime-genai's graph
of the same model holds 343 (30 × {GroupQueryAttention, 5 MatMuls, 2 SkipSimplifiedLayerNormalization,
SiLU}). At batch 1 a decode step is a few hundred microseconds of real work per layer, so the
per-node dispatch cost of the extra ~2,600 nodes was most of the 2× by which onnxruntime-genai int4
out-ran our onnxruntime int4 (75.0 vs 38.8 tok/s in the table before this graph existed, git history of
benchmarks/results/decode_table_smollm2.json). With it, paired, 1 thread (docs/measurement.md): the same
8-bit-weight file decodes 1.40× [1.31, 1.48] faster than on the portable graph, and our int4 reaches 0.82× of
onnxruntime-genai int4 (65.7 vs 79.9 tok/s).

How: the same TorchScript exporter as the portable graph, on a wrapper that walks the Hugging Face
model's own modules (so node scopes, weight names and the planned layers' MatMuls are the same, and
the int8/int4 variants are written from this graph by the same code, compiler/lowering/quant.py);
attention and the residual-add + RMSNorm pairs are `torch.autograd.Function`s whose ONNX `symbolic`
is the contrib op, whose `forward` computes the same thing in torch (to trace shapes).

Graph contract (batch 1; `runtimes/decode/onnxruntime_gqa.py` drives it):
  inputs  `input_ids` (1, S) int64, `attention_mask` (1, T) int64 (all ones: T = past + S),
          `past_key_values.{i}.key/value` (1, kv_heads, P, head_dim) fp32;
  outputs `logits` (1, S, vocab), `present.{i}.key/value`.
  `seqlens_k = sum(mask) − 1` and `total_sequence_length = T` are computed in the graph (as
  onnxruntime-genai does). When past and present are bound to the *same* buffer of max length,
  GroupQueryAttention appends in place (no cache copy per step); otherwise present = past ⊕ new.
  GroupQueryAttention's rotary positions come from `seqlens_k`, so a prompt must not be padded and a
  prompt after a non-empty past needs batch 1 — the decoder strips padding and runs rows one at a time.

Which models: `gqa_layout(module)` accepts Llama, Mistral (no active sliding window) and Qwen2 (no
sliding window) whose modules have the standard shape (q/k/v/o projections, SiLU gated MLP, RMSNorm,
a rotary embedding with a fixed frequency table); anything else gets no fused graph, with the reason
recorded in the manifest, and decodes on the portable graph as before.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compiler.ir import ModelIR
from compiler.lowering.export import EXPORT_OPSET, EXTERNAL_DATA_BYTES, GraphSpec, KVSpec, declare_opset, param_bytes, save_onnx
from compiler.lowering.files import GQA_FILE, path_rel
from compiler.lowering.format import OPSET, LoweringError, load_onnx

MODEL_TYPES = ("llama", "mistral", "qwen2")
FIXED_ROPE = ("default", "linear", "llama3")  # rotary tables that do not change with the sequence length
MAX_ROTARY_POSITIONS = 1 << 16  # cos/sin tables: (positions, head_dim / 2) fp32 each
MAX_LOGITS_DIFF = 1e-2  # |fused − torch| on the logits (SmolLM2, 30 layers: 8e-5; the portable graph: the same order)


@dataclass(frozen=True)
class GQALayout:
    """What the fused graph needs to know about the model."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    positions: int
    cos: torch.Tensor  # (positions, head_dim / 2)
    sin: torch.Tensor

    @property
    def kv(self) -> KVSpec:
        return KVSpec(self.layers, self.kv_heads, self.head_dim)


def gqa_layout(module: nn.Module, linears: tuple[type, ...] = (nn.Linear,)) -> GQALayout | str:
    """The model's fused-graph layout, or why it has none (one line). `linears`: the module types that count
    as a projection (the lean decoder host, runtimes/kernels/lean_decoder.py, also accepts packed layers)."""
    config: Any = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model type '{model_type}' is not one of {', '.join(MODEL_TYPES)}"
    inner = getattr(module, "model", None)
    parts = ("layers", "embed_tokens", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, p) for p in parts) or not isinstance(getattr(module, "lm_head", None), linears):
        return "the model does not have the model.{layers, embed_tokens, norm, rotary_emb} + lm_head structure"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return f"sliding-window attention ({window} of {config.max_position_embeddings} positions)"
    rotary = inner.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in FIXED_ROPE or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        return f"rotary embedding type '{rope_type}' changes with the sequence length"
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                  [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, linears) for m in projections):
            return f"layer {i} lacks the q/k/v/o and gate/up/down projections"
        if hasattr(attn, "q_norm") or getattr(config, "hidden_act", None) not in ("silu", "swish"):
            return f"layer {i}: per-head q/k norms or a non-SiLU MLP"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or getattr(norm, "bias", None) is not None:
                return f"layer {i}: a norm that is not RMSNorm"
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    attn0 = inner.layers[0].self_attn
    head_dim = int(getattr(attn0, "head_dim", config.hidden_size // heads))
    positions = min(int(config.max_position_embeddings), MAX_ROTARY_POSITIONS)
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), rotary.inv_freq.float().cpu())
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return GQALayout(len(inner.layers), heads, kv_heads, head_dim, float(getattr(attn0, "scaling", head_dim ** -0.5)),
                     positions, (freqs.cos() * scaling).contiguous(), (freqs.sin() * scaling).contiguous())


# -- the contrib ops, as torch functions with an ONNX symbolic -----------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary (Hugging Face's rotate_half) on (B, heads, S, D) with (S, D/2) tables."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _type_like(value: Any, like: Any) -> None:
    """Give a contrib op's output the dtype and rank of `like`, sizes unknown (the exporter cannot infer
    contrib ops and warns once per node otherwise)."""
    kind = like.type()
    rank = kind.dim()
    value.setType(kind.with_sizes([None] * rank) if rank is not None else kind)


class _GroupQueryAttention(torch.autograd.Function):
    """com.microsoft GroupQueryAttention (do_rotary=1, non-interleaved, causal), unpadded batch."""

    @staticmethod
    def forward(ctx: Any, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, heads: int, kv_heads: int,
                scale: float):  # type: ignore[override]
        b, s, _ = q.shape
        d = past_k.shape[-1]
        start = past_k.shape[2]
        q = q.view(b, s, heads, d).transpose(1, 2)
        k = k.view(b, s, kv_heads, d).transpose(1, 2)
        v = v.view(b, s, kv_heads, d).transpose(1, 2)
        c, sn = cos[start:start + s], sin[start:start + s]
        q, k = _rotate(q, c, sn), _rotate(k, c, sn)
        present_k, present_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        group = heads // kv_heads
        keys = present_k.repeat_interleave(group, dim=1)
        values = present_v.repeat_interleave(group, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * scale
        total_len = present_k.shape[2]
        causal = torch.ones(s, total_len, dtype=torch.bool).tril(diagonal=start)
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (scores.softmax(-1) @ values).transpose(1, 2).reshape(b, s, heads * d)
        return out, present_k, present_v

    @staticmethod
    def symbolic(g: Any, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, heads: int, kv_heads: int, scale: float):
        out = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total, cos, sin,
                   num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale, do_rotary_i=1,
                   rotary_interleaved_i=0, outputs=3)
        for value, like in zip(out, (q, past_k, past_v)):
            _type_like(value, like)
        return out


class _SkipRMSNorm(torch.autograd.Function):
    """com.microsoft SkipSimplifiedLayerNormalization: (RMSNorm(x + skip) · gamma, x + skip)."""

    @staticmethod
    def forward(ctx: Any, x, skip, gamma, eps: float):  # type: ignore[override]
        total = x + skip
        normed = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
        return gamma * normed, total

    @staticmethod
    def symbolic(g: Any, x, skip, gamma, eps: float):
        out = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, gamma, epsilon_f=eps, outputs=4)
        for value in out:
            _type_like(value, x)
        return out[0], out[3]


class _FusedDecoder(nn.Module):
    """input_ids, attention_mask, past… → logits, present…, through the HF model's own modules."""

    def __init__(self, model: nn.Module, layout: GQALayout):
        super().__init__()
        self.model = model
        self.layout = layout
        self.register_buffer("cos_cache", layout.cos, persistent=False)
        self.register_buffer("sin_cache", layout.sin, persistent=False)

    def forward(self, input_ids, attention_mask, *past):
        lay, inner = self.layout, self.model.model
        seqlens = (attention_mask.sum(dim=1) - 1).to(torch.int32)
        total = torch._shape_as_tensor(attention_mask)[1].to(torch.int32)
        residual = inner.embed_tokens(input_ids)
        x = inner.layers[0].input_layernorm(residual)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            out, pk, pv = _GroupQueryAttention.apply(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), past[2 * i],
                                                     past[2 * i + 1], seqlens, total, self.cos_cache, self.sin_cache,
                                                     lay.heads, lay.kv_heads, lay.scale)
            presents += [pk, pv]
            post = layer.post_attention_layernorm
            x, residual = _SkipRMSNorm.apply(attn.o_proj(out), residual, post.weight, float(post.variance_epsilon))
            hidden = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            norm = inner.layers[i + 1].input_layernorm if i + 1 < len(inner.layers) else inner.norm
            x, residual = _SkipRMSNorm.apply(hidden, residual, norm.weight, float(norm.variance_epsilon))
        return (self.model.lm_head(x), *presents)


def linear_order(module: nn.Module) -> list[str]:
    """Qualified names of the Linear modules in the order `_FusedDecoder.forward` calls them."""
    per_layer = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    inner: Any = module.model
    layers = inner.layers
    names = [f"model.layers.{i}.{p}" for i in range(len(layers)) for p in per_layer]
    return names + ["lm_head"]


def name_by_module(model: Any, module: nn.Module) -> None:
    """Give each weight MatMul the scope name the portable export gives it (`/model/<qualified name>/MatMul`),
    so `compiler.lowering.rules.layer_nodes` maps the planned layers here too. The exporter names a node
    after the leaf module only (the wrapper calls the projections directly), so the MatMuls are matched to
    `linear_order` in graph order — and each match is checked: same weight, element for element."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    order = linear_order(module)
    if len(matmuls) != len(order):
        raise LoweringError(f"fused graph: {len(matmuls)} weight MatMuls for {len(order)} projections")
    modules = dict(module.named_modules())
    for node, name in zip(matmuls, order):
        weight = modules[name].weight.detach().float().numpy().T
        got = numpy_helper.to_array(inits[node.input[1]])
        if got.shape != weight.shape or not np.array_equal(got, weight):
            raise LoweringError(f"fused graph: MatMul '{node.name}' does not hold {name}'s weight")
        node.name = f"/model/{name}/MatMul"


def gqa_spec(layout: GQALayout) -> GraphSpec:
    past = [f"past_key_values.{i}.{t}" for i in range(layout.layers) for t in ("key", "value")]
    present = [f"present.{i}.{t}" for i in range(layout.layers) for t in ("key", "value")]
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                                       "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                                       "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present})
    return GraphSpec("text-generation", ("input_ids", "attention_mask", *past), ("logits", *present), axes, layout.kv)


def export_gqa(ir: ModelIR, path: Path, layout: GQALayout) -> GraphSpec:
    """Export the fused decode graph of `ir.module` to `path` (fp32, weights as in the portable graph)."""
    spec = gqa_spec(layout)
    vocab = int(getattr(ir.config, "vocab_size", 100) or 100)
    seq, past_len = 5, 3
    dummy = (torch.randint(min(3, vocab - 1), vocab, (1, seq)), torch.ones(1, past_len + seq, dtype=torch.long),
             *[torch.randn(1, layout.kv_heads, past_len, layout.head_dim) for _ in range(2 * layout.layers)])
    tmp = Path(tempfile.mkdtemp(prefix=".export-gqa-", dir=path.parent))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapper = _FusedDecoder(ir.module, layout).eval()
            torch.onnx.export(wrapper, dummy, str(tmp / path.name), dynamo=False, opset_version=EXPORT_OPSET,
                              input_names=list(spec.inputs), output_names=list(spec.outputs),
                              dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
        model = load_onnx(tmp / path.name)
        declare_opset(model, OPSET)
        name_by_module(model, ir.module)
        save_onnx(model, path, external=param_bytes(ir.module) > EXTERNAL_DATA_BYTES, data_file=path.name + ".data")
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything; keep the message
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise LoweringError(f"fused (GroupQueryAttention) export failed for {type(ir.module).__name__}: "
                            f"{type(exc).__name__}: {first}") from exc
    finally:
        ir.module.eval()
        shutil.rmtree(tmp, ignore_errors=True)
    return spec


# -- checking it against the torch model -------------------------------------------------------------------
def gqa_numerics(ir: ModelIR, portable: GraphSpec, path: Path, ids: np.ndarray) -> dict[str, float]:
    """Max |fused graph − torch| of the logits and the cache on one unpadded prompt (prefill) and one
    decode step after it, the torch side through the portable graph's wrapper (the model as exported)."""
    import onnxruntime as ort

    from compiler.lowering.export import torch_outputs
    from compiler.lowering.feeds import lm_feeds, present_to_past

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert portable.kv is not None, "a causal LM's portable graph has a KV layout"
    lowering = {"inputs": list(portable.inputs), "kv": portable.kv.to_dict()}
    ids = ids[:1].astype(np.int64)
    mask = np.ones_like(ids)
    worst = {"logits": 0.0, "present": 0.0}
    past = None
    for _ in range(2):
        feeds = lm_feeds(lowering, ids, mask, past)
        ref = torch_outputs(ir, portable, feeds)
        got = dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k != "position_ids"})))
        for name in names:
            key = "logits" if name == "logits" else "present"
            worst[key] = max(worst[key], float(np.abs(got[name] - ref[name]).max()))
        past = present_to_past(got)
        ids = np.argmax(got["logits"][:, -1:, :], axis=-1).astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return worst


def write_fused_graph(ir: ModelIR, portable: GraphSpec, portable_path: Path, ids: np.ndarray) -> dict[str, Any]:
    """Write `decode_gqa.onnx` beside the portable fp32 graph when the model has the layout; returns the
    manifest entry (`file`, node count, numerics vs torch) or `{"reason": why not}`. A graph whose logits
    move more than `MAX_LOGITS_DIFF` from the torch model's is removed, with the reason recorded."""
    if portable.task != "text-generation":
        return {"reason": "not a causal LM"}
    layout = gqa_layout(ir.module)
    if isinstance(layout, str):
        return {"reason": layout}
    path = portable_path.parent / GQA_FILE
    export_gqa(ir, path, layout)
    numerics = gqa_numerics(ir, portable, path, ids)
    import onnx

    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)  # the graph only, not the weights again
    entry = {"file": path_rel(path), "op": "GroupQueryAttention", "nodes": nodes,
             "positions": layout.positions, "numerics": numerics}
    if not numerics["logits"] <= MAX_LOGITS_DIFF:
        for f in (path, path.with_name(path.name + ".data")):
            f.unlink(missing_ok=True)
        return {"reason": f"fused graph logits differ from torch by {numerics['logits']:.3g} (> {MAX_LOGITS_DIFF})",
                "numerics": numerics}
    return entry
