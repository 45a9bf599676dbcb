"""Write an artifact's planned layers in the packed format: ART/sparsec/weights.safetensors.

`pack_artifact(ART)` reads the manifest plan and the transformed model in ART/model/ and packs every
planned layer: int8 (per-output-channel scales, activations quantized per token at run time) where
the plan quantizes it to int8, int4 (group-64 fp16 scales, same int8 activations) where it plans
int4, bf16 (fp32 activations) where it plans bf16 and for the layers an int8 / int4 plan leaves
unquantized (the quantize pass's activation-outlier rule; `unquantized_values`), fp32 otherwise.
A layer whose measured sparsity is below `min_sparsity` gains nothing from the bitmask (it costs 1/8
byte per weight): int8 / int4 / bf16 layers then take the dense kernel of their kind, fp32 ones stay
ordinary torch Linears. The LM head
(tied to the embedding on small LMs, and the largest single matrix of SmolLM2-135M: 49152 x 576), when
the plan leaves it out, gets the dense int8 kernel (`lm_head="auto"`; dense bf16 in a bf16 plan)
unless `lm_head="none"`. Packing reads the dense model once (it is the lowering step); running never does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtimes.kernels.format import PackedLinear, pack_linear, save_packed

PACKED_DIR = "sparsec"
WEIGHTS = "weights.safetensors"
SUMMARY = "format.json"
INT8_SCHEMES = ("int8", "int8-dynamic", "int8-weight")  # int8-weight: our int8 kernels (activations per token)
INT4_SCHEMES = ("int4",)
BF16_SCHEMES = ("bf16",)
LM_HEAD_KINDS = ("auto", "dense-int8", "dense-bf16", "none")


def packed_kind(quant: str | None, sparse: bool, unquantized: str = "fp32") -> str | None:
    """The packed kind of a planned layer: its plan's quantization and whether the mask pays; None = the
    layer stays a torch Linear (dense fp32). `unquantized`: what a layer without a quantization takes
    ("fp32", or "bf16": see `unquantized_values`)."""
    if quant in INT8_SCHEMES:
        return "sparse-int8" if sparse else "dense-int8"
    if quant in INT4_SCHEMES:
        return "sparse-int4" if sparse else "dense-int4"
    if quant in BF16_SCHEMES or unquantized == "bf16":
        return "sparse-bf16" if sparse else "dense-bf16"
    return "sparse-fp32" if sparse else None


def unquantized_values(plan: dict[str, dict[str, Any]]) -> str:
    """bf16 for the planned layers an int8 / int4 plan leaves unquantized, fp32 in a plan with no quantization.

    Why: the quantize pass keeps a layer out of int8 when its *activations* carry outliers (its
    `max_activation_ratio` rule) — a concern of int8 activations, which bf16 weights do not have (the bf16
    kernels keep activations and sums fp32; a bf16 weight is within 2^-9 of the fp32 one). Left fp32 such a
    layer read 4 bytes per kept weight: on SmolLM2 37.5 % SparseGPT int8 the quantize pass left 32 of 210
    layers fp32 and the model decoded at 0.68–0.75× the same weights all-int8 (docs/kernels.md, "Matched
    quality"). A plan without any quantization keeps fp32: the user asked for no rounding."""
    quantized = any((e or {}).get("quant") in INT8_SCHEMES + INT4_SCHEMES for e in plan.values())
    return "bf16" if quantized else "fp32"


@dataclass(frozen=True)
class PackResult:
    directory: Path
    layers: dict[str, dict[str, Any]]
    packed_bytes: int
    dense_fp32_bytes: int


def load_artifact_model(model_dir: Path) -> nn.Module:
    """The artifact's transformed HF model in fp32 (the class its config names)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    cls = model_class(config)
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def model_class(config: Any):
    """The transformers class of config.architectures[0] (what save_pretrained wrote), else AutoModel."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    return transformers.AutoModel


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as [out, in], bias) of a Linear or a GPT-2 Conv1D (stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t().contiguous(), module.bias.detach()
    raise ValueError(f"cannot pack a {type(module).__name__}: only Linear and GPT-2 Conv1D layers")


def output_embedding_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def head_kind(lm_head: str, plan: dict[str, dict[str, Any]]) -> str:
    """`auto`: a bf16 plan's head stays bf16 (no int8 error where the user asked for none), else dense int8."""
    if lm_head not in LM_HEAD_KINDS:
        raise ValueError(f"error: lm_head must be one of {', '.join(LM_HEAD_KINDS)}, got '{lm_head}'")
    if lm_head != "auto":
        return lm_head
    return "dense-bf16" if any((e or {}).get("quant") in BF16_SCHEMES for e in plan.values()) else "dense-int8"


def pack_model(model: nn.Module, plan: dict[str, dict[str, Any]], *, min_sparsity: float = 0.25,
               lm_head: str = "auto") -> dict[str, PackedLinear]:
    """Packed layers for `plan` (layer name -> plan entry) of an in-memory model."""
    lm_head = head_kind(lm_head, plan)
    unquantized = unquantized_values(plan)
    output_embedding = output_embedding_name(model)
    layers: dict[str, PackedLinear] = {}
    for name, entry in plan.items():
        weight, bias = linear_weight(model.get_submodule(name))
        sparsity = float((weight == 0).sum()) / weight.numel()
        # an unquantized LM head in the plan is left to `lm_head` (below), not to the bf16 fallback
        kind = packed_kind((entry or {}).get("quant"), sparsity >= min_sparsity,
                           "fp32" if name == output_embedding else unquantized)
        if kind is None:
            continue  # a dense fp32 layer: torch's own Linear is the fastest dense fp32 kernel here
        packed = pack_linear(weight, kind, bias)
        packed.meta.update({"sparsity": round(sparsity, 6), "transposed": int(not isinstance(model.get_submodule(name), nn.Linear))})
        layers[name] = packed
    head = output_embedding if lm_head != "none" else None
    if head and head not in layers:
        weight, bias = linear_weight(model.get_submodule(head))
        layers[head] = pack_linear(weight, lm_head, bias)
        layers[head].meta.update({"sparsity": 0.0, "transposed": 0, "role": "lm_head"})
    return layers


def pack_artifact(artifact: str | Path, out: str | Path | None = None, *, min_sparsity: float = 0.25,
                  lm_head: str = "auto", plan: dict[str, dict[str, Any]] | None = None) -> PackResult:
    """Pack ART's planned layers into ART/sparsec/ (or `out`); returns what was written. `plan`: the
    plan to pack (the compile driver passes it before manifest.json exists), else the manifest's."""
    root = Path(artifact)
    manifest_path = root / "manifest.json"
    if plan is None and not manifest_path.is_file():
        raise FileNotFoundError(f"error: '{root}' is not a sparsec artifact (no manifest.json)")
    if not (root / "model" / "config.json").is_file():
        raise FileNotFoundError(f"error: artifact '{root}' has no Hugging Face model/ directory to pack")
    if plan is None:
        plan = json.loads(manifest_path.read_text(encoding="utf-8")).get("plan") or {}
    if not plan:
        raise ValueError(f"error: artifact '{root}' has an empty plan: nothing to pack")
    model = load_artifact_model(root / "model")
    layers = pack_model(model, plan, min_sparsity=min_sparsity, lm_head=lm_head)
    directory = Path(out) if out is not None else root / PACKED_DIR
    save_packed(layers, directory / WEIGHTS)
    summary = {name: {"kind": p.kind, "out": p.out_features, "in": p.in_features, "sparsity": p.meta.get("sparsity"),
                      "bytes": p.stored_bytes(), "dense_fp32_bytes": 4 * p.out_features * p.in_features}
               for name, p in layers.items()}
    packed_bytes = sum(v["bytes"] for v in summary.values())
    dense_bytes = sum(v["dense_fp32_bytes"] for v in summary.values())
    (directory / SUMMARY).write_text(json.dumps({"format": "sparsec-packed-v1", "weights": WEIGHTS, "layers": summary,
                                                 "packed_bytes": packed_bytes, "dense_fp32_bytes": dense_bytes},
                                                indent=2) + "\n", encoding="utf-8")
    return PackResult(directory, summary, packed_bytes, dense_bytes)
