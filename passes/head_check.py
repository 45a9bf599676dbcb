"""Would quantizing a causal LM's head cost perplexity? A check on real hidden states and real next tokens.

The LM head (hidden → vocab, 49152 × 576 on SmolLM2: 28 M of its 135 M weights, read whole for every
token) is a large share of the bytes a decode step reads, so leaving it fp32 caps what int8/int4 buy;
quantizing it is only worth it when the model's predictions barely move. This module measures that:
the head's input over the calibration text (one forward per sample, a hook on the head; the first
`MAX_TOKENS` tokens), logits of the fp32 head vs the head with the scheme's quantization simulated in
torch —
- `int8` / `int8-dynamic`: int8 weights per output channel (symmetric), activations u8 asymmetric per
  token (dynamic) or per tensor over the checked tokens (static), as the lowered graphs run them;
- `int4` / `int8-weight`: 4- / 8-bit asymmetric weights in groups of 64 along the input dimension,
  activations float —
and the cross-entropy of each on the text's actual next tokens. The criterion is the perplexity the
head alone adds, exp(CE_quantized − CE_fp32) − 1 ≤ `MAX_PPL_INCREASE` (1 %): the unit the quality
budget is written in (issue 14: within 50 % of dense), so a head that passes spends at most 1/50 of it;
and the mean KL divergence (fp32 ‖ quantized) ≤ `MAX_KL` (0.01 nats): on a text the model predicts
poorly, noise can lower the cross-entropy by chance, the KL cannot.
Top-1 agreement is reported beside them (on SmolLM2 an int8 head flips 2–4 % of
top-1 choices, nearly all between near-equal candidates). The quantizers are round-to-nearest and never
look at the data, so the calibration tokens are held out from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from compiler.ir import ModelIR
from compiler.trace import call_model

MAX_PPL_INCREASE = 0.01
MAX_KL = 0.01  # nats per token: the distributions must agree too (a random model's CE can fall by chance)
MAX_TOKENS = 512  # next-token predictions checked (the first samples'); logits in chunks of CHUNK rows
CHUNK = 256
INT4_GROUP = 64


@dataclass(frozen=True)
class HeadCheck:
    layer: str
    scheme: str
    tokens: int
    ppl_increase: float  # exp(CE_quantized - CE_fp32) - 1 on the tokens' actual next tokens
    top1_agreement: float
    mean_kl: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, failed: str = "stays fp32") -> str:
        """`failed`: what a failed check means (the fallback scheme's check may still follow)."""
        verdict = "quantized" if self.passed else failed
        return (f"{self.layer} {verdict} ({self.scheme}): perplexity {self.ppl_increase:+.2%} "
                f"(limit +{MAX_PPL_INCREASE:.0%}), KL {self.mean_kl:.4f} (limit {MAX_KL}), top-1 agreement {self.top1_agreement:.4f} "
                f"on {self.tokens} calibration tokens")


def head_inputs(ir: ModelIR, name: str, samples: list[dict[str, Any]],
                max_tokens: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (n, in_features) of layer `name`, next-token ids (n,)) over the first samples: every
    position that has a next token (padding excluded where the sample has an attention mask)."""
    rows: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    current: dict[str, Any] = {}

    def hook(_module, inputs, _output) -> None:
        x = inputs[0].detach().float()
        ids = current["input_ids"]
        if x.shape[:-1] != ids.shape:
            return
        mask = current.get("attention_mask")
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        has_next = keep[:, :-1] & keep[:, 1:]
        rows.append(x[:, :-1][has_next])
        labels.append(ids[:, 1:][has_next])

    handle = ir.get_module(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for sample in samples:
                if "input_ids" not in sample:
                    continue
                current.clear()
                current.update(sample)
                call_model(ir.module, sample)
                if sum(r.shape[0] for r in rows) >= max_tokens:
                    break
    finally:
        handle.remove()
    if not rows:
        return torch.zeros(0, ir.layers[name].in_features), torch.zeros(0, dtype=torch.long)
    return torch.cat(rows)[:max_tokens], torch.cat(labels)[:max_tokens].long()


WEIGHT_ONLY_BITS = {"int4": 4, "int8-weight": 8}


def fake_quant_weight(w: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "bf16":
        return w.to(torch.bfloat16).to(w.dtype)
    if scheme in WEIGHT_ONLY_BITS:
        levels = (1 << WEIGHT_ONLY_BITS[scheme]) - 1
        out, k = w.shape
        pad = (-k) % INT4_GROUP
        g = torch.nn.functional.pad(w, (0, pad)).reshape(out, -1, INT4_GROUP)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / levels).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(g / scale) + zero, 0, levels) - zero) * scale
        return q.reshape(out, -1)[:, :k]
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def fake_quant_activations(x: torch.Tensor, scheme: str, static_range: tuple[float, float] | None) -> torch.Tensor:
    if scheme in WEIGHT_ONLY_BITS or scheme == "bf16":
        return x
    if scheme == "int8" and static_range is not None:
        lo = torch.tensor(min(static_range[0], 0.0))
        hi = torch.tensor(max(static_range[1], 0.0))
    else:  # dynamic: the range of each token's row
        lo = x.amin(-1, keepdim=True).clamp_max(0)
        hi = x.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / 255).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def check_head(ir: ModelIR, name: str, samples: list[dict[str, Any]], scheme: str) -> HeadCheck:
    """Perplexity cost (and agreement) of quantizing layer `name` with `scheme`, on calibration text."""
    x, labels = head_inputs(ir, name, samples)
    w = ir.weight(name).detach().float()
    bias = getattr(ir.get_module(name), "bias", None)
    wq = fake_quant_weight(w, scheme)
    static = (float(x.min()), float(x.max())) if x.numel() else None
    agree, kl_sum, ce_ref, ce_got = 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], CHUNK):
            xs, ys = x[start:start + CHUNK], labels[start:start + CHUNK]
            ref = xs @ w.T
            got = fake_quant_activations(xs, scheme, static) @ wq.T
            if bias is not None:
                ref, got = ref + bias.float(), got + bias.float()
            logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            kl_sum += float((logp.exp() * (logp - logq)).sum())
            ce_ref -= float(logp.gather(-1, ys[:, None]).sum())
            ce_got -= float(logq.gather(-1, ys[:, None]).sum())
    n = x.shape[0]
    if not n:
        return HeadCheck(name, scheme, 0, float("inf"), 0.0, float("inf"), False)
    increase = math.exp((ce_got - ce_ref) / n) - 1.0
    return HeadCheck(name, scheme, n, round(increase, 6), round(agree / n, 6), round(kl_sum / n, 6),
                     increase <= MAX_PPL_INCREASE and kl_sum / n <= MAX_KL)
