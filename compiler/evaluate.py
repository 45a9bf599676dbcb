"""Quality of a compiled model against its dense source, on held-out text.

- Causal LMs: perplexity with strided windows (each window of `seqlen` tokens re-reads up to
  `seqlen − stride` tokens of context and scores only its new tokens), over at most `max_tokens`
  tokens — memory is one window, whatever the corpus size.
- Encoders (and the encoder of seq2seq models): mean-pooled (attention-masked) last hidden states,
  cosine between the compiled and the dense model per text, averaged.
- Plain modules without a tokenizer: cosine of the first output on the model's example inputs.
- Beyond these (compiler/agreement.py): LMs also get next-token top-1 agreement with the dense model and
  greedy-continuation agreement on held-out prompts; encoders get nearest-neighbour retrieval overlap.
  The dense side is cached on disk per source weights + data + settings.

`evaluate_pair` is what `sparsec compile --eval-data` calls; `sparsec eval` (compiler/cli_eval.py)
uses the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compiler.calibration import CalibrationConfig, effective_seqlen, load_texts
from compiler.errors import CalibrationError
from compiler.stats import first_tensor
from compiler.trace import call_model


@dataclass(frozen=True)
class EvalConfig:
    seqlen: int = 256  # window length (capped by the model's positions)
    stride: int = 128  # new tokens scored per window
    max_tokens: int = 16384  # perplexity: tokens of the corpus evaluated
    max_texts: int = 256  # embeddings: texts compared
    batch_size: int = 8
    greedy_prompts: int = 8  # LMs: held-out prompts greedy-decoded by both models (0: skip)
    greedy_prompt_len: int = 32  # tokens per prompt
    greedy_tokens: int = 32  # new tokens decoded per prompt
    knn: int = 10  # encoders: neighbours compared per text (retrieval overlap)

    def __post_init__(self) -> None:
        if self.greedy_prompts < 0:
            raise CalibrationError(f"evaluation greedy_prompts must be >= 0, got {self.greedy_prompts}")
        for key in ("seqlen", "stride", "max_tokens", "max_texts", "batch_size", "greedy_prompt_len", "greedy_tokens", "knn"):
            if getattr(self, key) <= 0:
                raise CalibrationError(f"evaluation {key} must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class Perplexity:
    value: float
    nll: float  # mean negative log-likelihood per scored token
    tokens: int
    windows: int
    top1: torch.Tensor | None = field(default=None, compare=False, repr=False)  # argmax per scored token


def corpus_ids(tokenizer: Any, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Token ids of the texts joined by blank lines, cut to max_tokens (only what is needed is tokenized)."""
    chosen, chars = [], 0
    for t in texts:
        chosen.append(t)
        chars += len(t)
        if chars > max_tokens * 16:  # far more characters than tokens needed
            break
    ids = tokenizer("\n\n".join(chosen), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def perplexity(module: nn.Module, ids: torch.Tensor, seqlen: int, stride: int) -> Perplexity:
    """Strided-window perplexity of a causal LM over a 1-D token tensor."""
    if ids.numel() < 2:
        raise CalibrationError(f"evaluation text has {ids.numel()} tokens: need at least 2 for perplexity")
    stride = min(stride, seqlen)
    total_nll, scored, windows, prev_end = 0.0, 0, 0, 0
    top1: list[torch.Tensor] = []
    n = ids.numel()
    spans = []
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        spans.append((begin, end, end - max(prev_end, begin)))  # new: tokens not scored by an earlier window
        prev_end = end
        if end == n:
            break
    with torch.no_grad():
        for (begin, end, new), logits in zip(spans, _window_logits(module, ids, spans, seqlen)):
            logits = logits.float()
            window = ids[begin:end].unsqueeze(0)
            targets = window[0, 1:]
            logp = F.log_softmax(logits[0, :-1], dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
            take = min(new, logp.numel())
            total_nll -= float(logp[-take:].sum()) if take else 0.0
            if take:
                top1.append(logits[0, :-1][-take:].argmax(-1))
            scored += take
            windows += 1
    nll = total_nll / max(scored, 1)
    return Perplexity(math.exp(nll), nll, scored, windows, torch.cat(top1) if top1 else torch.zeros(0, dtype=torch.long))


def _window_logits(module: nn.Module, ids: torch.Tensor, spans: list[tuple[int, int, int]], seqlen: int):
    """Logits of each window, in order. A streamed model (compiler/streaming) computes them block-major,
    a chunk of windows per read of the weights, with the same per-window calls (identical values)."""
    from compiler.streaming.forward import streamed_outputs, window_chunks
    from compiler.streaming.streamed_ir import streamed_ir_of

    ir = streamed_ir_of(module)
    if ir is None:
        for begin, end, _ in spans:
            yield module(input_ids=ids[begin:end].unsqueeze(0), use_cache=False).logits
        return
    chunk = window_chunks(len(spans), seqlen, ir.batch_tokens)
    for i in range(0, len(spans), chunk):
        samples = [{"input_ids": ids[b:e].unsqueeze(0)} for b, e, _ in spans[i : i + chunk]]
        for out in streamed_outputs(ir, samples):
            yield out.logits


def _encoder(module: nn.Module, model_type: str) -> nn.Module:
    if model_type == "seq2seq" and hasattr(module, "get_encoder"):
        return module.get_encoder()
    base = getattr(module, "base_model", None)
    return base if model_type == "sequence-classification" and isinstance(base, nn.Module) else module


def mean_pooled(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attention-masked mean of the last hidden states: (batch, hidden)."""
    with torch.no_grad():
        out = module(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def embeddings(module: nn.Module, tokenizer: Any, texts: list[str], cfg: EvalConfig, model_type: str = "encoder",
               seqlen: int | None = None) -> torch.Tensor:
    """Mean-pooled embeddings of the first `cfg.max_texts` texts, truncated to `seqlen` tokens: (n, hidden)."""
    texts = texts[: cfg.max_texts]
    enc_module = _encoder(module, model_type)
    out = []
    for i in range(0, len(texts), cfg.batch_size):
        enc = tokenizer(texts[i : i + cfg.batch_size], padding=True, truncation=True, max_length=seqlen or cfg.seqlen, return_tensors="pt")
        out.append(mean_pooled(enc_module, {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}))
    return torch.cat(out) if out else torch.zeros(0, 0)


def embedding_cosines(dense: nn.Module, compiled: nn.Module, tokenizer: Any, texts: list[str], cfg: EvalConfig,
                      model_type: str = "encoder", seqlen: int | None = None) -> torch.Tensor:
    """Per-text cosine between mean-pooled embeddings of the compiled and the dense model."""
    ref = embeddings(dense, tokenizer, texts, cfg, model_type, seqlen)
    return F.cosine_similarity(embeddings(compiled, tokenizer, texts, cfg, model_type, seqlen), ref, dim=-1)


def output_cosine(dense: nn.Module, compiled: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        a, b = call_model(dense, inputs), call_model(compiled, inputs)
    a, b = (first_tensor(x).flatten().float() for x in (a, b))
    return float(F.cosine_similarity(a, b, dim=0))


@dataclass(frozen=True)
class Reference:
    """The dense side of an evaluation, computed once; `compare(compiled_ir)` scores a compiled model.
    (Benchmarks compare many compiled variants against one Reference.)"""

    dense_ir: Any
    data: str
    cfg: EvalConfig
    metric: str
    seqlen: int
    texts: list[str] | None = None
    ids: torch.Tensor | None = None
    dense_ppl: Perplexity | None = None
    dense_emb: torch.Tensor | None = None
    prompts: list[torch.Tensor] | None = None  # LMs: held-out greedy prompts
    dense_greedy: list[torch.Tensor] | None = None
    dense_nn: torch.Tensor | None = None  # encoders: each text's dense nearest neighbours
    cached: bool = False  # the dense figures came from the on-disk cache (compiler/agreement.py)

    @classmethod
    def build(cls, dense_ir: Any, data: str, cfg: EvalConfig | None = None, use_cache: bool = True) -> "Reference":
        from dataclasses import asdict, replace

        from compiler import agreement
        from compiler.streaming.streamed_ir import streamed_ir_of

        cfg = cfg or EvalConfig()
        if streamed_ir_of(dense_ir.module) is not None:
            # streamed: no on-disk cache keyed by the weights' hash (one more full read), and no greedy
            # decoding (every decoded token would read every block once more)
            cfg, use_cache = replace(cfg, greedy_prompts=0), False
        seqlen = effective_seqlen(cfg.seqlen, dense_ir.config)
        if dense_ir.tokenizer is None:
            return cls(dense_ir, "example_inputs", cfg, "output_cosine", seqlen)
        texts = load_texts(data)
        ids = corpus_ids(dense_ir.tokenizer, texts, cfg.max_tokens) if dense_ir.model_type == "causal-lm" else None
        # the key covers what is scored (the token ids; the texts and the tokenizer's vocabulary for encoders),
        # not only the data's name: the same weights with another tokenizer or corpus must not hit
        scored = agreement.inputs_digest(ids, texts, dense_ir.tokenizer)
        key = agreement.cache_key(dense_ir.module, data, {**asdict(cfg), "seqlen": seqlen, "type": dense_ir.model_type,
                                                          "inputs": scored}) if use_cache else None
        hit = agreement.load_cached(key) if key else None
        if ids is not None:
            prompts = agreement.prompts_from_ids(ids, cfg.greedy_prompts, cfg.greedy_prompt_len)
            if hit is None:
                ppl = perplexity(dense_ir.module, ids, seqlen, cfg.stride)
                greedy = [agreement.greedy_continuation(dense_ir.module, p, cfg.greedy_tokens) for p in prompts]
                if key:
                    agreement.store_cached(key, {"ppl": [ppl.value, ppl.nll, ppl.tokens, ppl.windows], "top1": ppl.top1, "greedy": greedy})
            else:
                ppl = Perplexity(*hit["ppl"], top1=hit["top1"])
                greedy = list(hit["greedy"])
            return cls(dense_ir, data, cfg, "perplexity", seqlen, ids=ids, dense_ppl=ppl, prompts=prompts,
                       dense_greedy=greedy, cached=hit is not None)
        if hit is None:
            emb = embeddings(dense_ir.module, dense_ir.tokenizer, texts, cfg, dense_ir.model_type, seqlen)
            if key:
                agreement.store_cached(key, {"emb": emb})
        else:
            emb = hit["emb"]
        return cls(dense_ir, data, cfg, "embedding_cosine", seqlen, texts=texts, dense_emb=emb,
                   dense_nn=agreement.neighbours(emb, cfg.knn), cached=hit is not None)

    def compare(self, compiled_ir: Any) -> dict[str, Any]:
        if self.metric == "output_cosine":
            cos = output_cosine(self.dense_ir.module, compiled_ir.module, self.dense_ir.example_inputs or {})
            return {"metric": self.metric, "data": self.data, "dense": 1.0, "compiled": cos, "samples": 1}
        if self.metric == "perplexity":
            from compiler import agreement

            c = perplexity(compiled_ir.module, self.ids, self.seqlen, self.cfg.stride)
            out = {"metric": self.metric, "data": self.data, "dense": self.dense_ppl.value, "compiled": c.value,
                   "ratio": c.value / self.dense_ppl.value, "tokens": c.tokens, "windows": c.windows,
                   "seqlen": self.seqlen, "stride": min(self.cfg.stride, self.seqlen),
                   "top1_agreement": agreement.top1_agreement(self.dense_ppl.top1, c.top1)}
            if self.prompts:
                greedy = [agreement.greedy_continuation(compiled_ir.module, p, self.cfg.greedy_tokens) for p in self.prompts]
                out.update(agreement.greedy_agreement(self.dense_greedy, greedy))
                out.update({"greedy_prompts": len(self.prompts), "greedy_tokens": self.cfg.greedy_tokens})
            out["dense_cached"] = self.cached
            return out
        from compiler import agreement

        emb = embeddings(compiled_ir.module, self.dense_ir.tokenizer, self.texts, self.cfg, self.dense_ir.model_type, self.seqlen)
        cos = F.cosine_similarity(emb, self.dense_emb, dim=-1)
        k = int(self.dense_nn.shape[1])
        return {"metric": self.metric, "data": self.data, "dense": 1.0, "compiled": float(cos.mean()),
                "min": float(cos.min()), "samples": int(cos.numel()), "seqlen": self.seqlen,
                f"retrieval_overlap@{k}": agreement.retrieval_overlap(self.dense_nn, emb, k), "dense_cached": self.cached}


def evaluate_pair(dense_ir: Any, compiled_ir: Any, data: str, calib_cfg: CalibrationConfig | None = None,
                  cfg: EvalConfig | None = None) -> dict[str, Any]:
    """Compare the compiled model with the dense one on held-out `data` ('eval' = built-in corpus).
    `calib_cfg` (the compile's calibration settings) only serves to flag data that is not held out."""
    result = Reference.build(dense_ir, data, cfg).compare(compiled_ir)
    if calib_cfg is not None and _same_source(data, calib_cfg.source):
        result["note"] = "evaluated on the calibration data itself: not held out"
    return result


def _same_source(a: str, b: str) -> bool:
    builtin = {"default": "stdlib", "stdlib": "stdlib", "eval": "stdlib-eval", "stdlib-eval": "stdlib-eval"}
    return builtin.get(a, a) == builtin.get(b, b)


@dataclass(frozen=True)
class EvalTarget:
    """What `sparsec eval` compares: a model path and its dense reference (None: perplexity only)."""

    model: str
    reference: str | None
    artifact: str | None = None


def resolve_target(model_or_artifact: str, reference: str | None) -> EvalTarget:
    """An artifact directory evaluates ARTIFACT/model against manifest source.resolved (sha256-verified)."""
    from pathlib import Path

    from compiler.artifact import MANIFEST, Artifact

    path = Path(model_or_artifact)
    if path.is_dir() and (path / MANIFEST).is_file():
        art = Artifact.load(path)
        ref = reference or art.manifest.get("source", {}).get("resolved")
        return EvalTarget(str(path / "model"), ref, str(path))
    return EvalTarget(model_or_artifact, reference)


def evaluate_models(target: EvalTarget, data: str, cfg: EvalConfig | None = None, stream: bool | None = None,
                    max_memory: int | None = None) -> dict[str, Any]:
    """Load the model (and reference) and evaluate on `data`; the `sparsec eval` command's work.
    Each model is streamed block by block when forced or when it would not fit (docs/streaming.md)."""
    from compiler.errors import SpecError
    from compiler.streaming.runner import decide, load_ir

    cfg = cfg or EvalConfig()
    copies = 2 if target.reference else 1
    decisions = {m: decide(m, stream, max_memory, copies=copies, samples=1, seqlen=cfg.seqlen)
                 for m in filter(None, (target.model, target.reference))}
    compiled = load_ir(target.model, decisions[target.model])
    dense = load_ir(target.reference, decisions[target.reference]) if target.reference else None
    head = {"model": target.model, "reference": target.reference, "artifact": target.artifact,
            "streamed": decisions[target.model].stream}
    if dense is not None:
        return {**head, **evaluate_pair(dense, compiled, data, cfg=cfg)}
    if compiled.model_type != "causal-lm" or compiled.tokenizer is None:
        raise SpecError(f"'{target.model}' is not a causal LM with a tokenizer: embedding fidelity needs a dense "
                        "reference (pass --reference MODEL, or evaluate an artifact)")
    own = Reference.build(compiled, data, cfg).dense_ppl
    return {**head, "metric": "perplexity", "data": data, "dense": None, "compiled": own.value, "tokens": own.tokens,
            "windows": own.windows, "seqlen": effective_seqlen(cfg.seqlen, compiled.config), "stride": cfg.stride}
