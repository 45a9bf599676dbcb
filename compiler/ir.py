"""The model IR: the torch module (weights live there), its structure (blocks of prunable layers in
execution order), the plan (per-layer decisions) and the analyses store.

Weight matrices are always seen as (out_features, in_features): GPT-2 `Conv1D` stores (in, out) and
`Conv2d` stores (out, in, kh, kw); `weight_matrix` / `set_weight_matrix` hide that, so every pass
does its math on one layout and N:M groups always run along the input (reduction) axis.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

LayerKind = Literal["linear", "conv1d", "conv2d"]


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight: its qualified name in the module tree, kind and matrix shape."""

    name: str
    kind: LayerKind
    out_features: int
    in_features: int
    block: int | None  # index into ModelIR.blocks; None for layers outside the repeated blocks

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Block:
    """A unit of sequential calibration (e.g. one decoder layer): a module and its prunable layers."""

    index: int
    name: str  # qualified module name ("" for the root module in the single-block fallback)
    layers: tuple[str, ...]


@dataclass
class LayerPlan:
    """Decisions for one prunable layer. `measured_sparsity` is filled from the real weights."""

    block: int | None
    params: int
    target_sparsity: float | None = None
    measured_sparsity: float = 0.0
    pattern: str | None = None  # "unstructured" | "N:M" | None
    quant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelIR:
    """Everything passes see. Passes mutate `module` weights and `plan`; analyses live in `analyses`."""

    module: nn.Module
    blocks: list[Block]
    layers: dict[str, PrunableLayer]  # execution order
    source: str
    model_type: str  # "causal-lm" | "encoder" | "seq2seq" | "module"
    config: Any = None  # transformers PretrainedConfig when present
    tokenizer: Any = None
    example_inputs: dict[str, torch.Tensor] | None = None
    plan: dict[str, LayerPlan] = field(default_factory=dict)
    analyses: dict[str, Any] = field(default_factory=dict)
    source_dir: Path | None = None  # the local HF directory the model came from, if any

    def __post_init__(self) -> None:
        for name, layer in self.layers.items():
            self.plan.setdefault(name, LayerPlan(block=layer.block, params=layer.params))

    # -- module access -------------------------------------------------------------------------
    def get_module(self, name: str) -> nn.Module:
        return self.module.get_submodule(name) if name else self.module

    def block_module(self, block: Block) -> nn.Module:
        return self.get_module(block.name)

    def block_layers(self, block: Block) -> list[PrunableLayer]:
        return [self.layers[n] for n in block.layers]

    def weight(self, name: str) -> torch.Tensor:
        return weight_matrix(self.get_module(name), self.layers[name].kind)

    def set_weight(self, name: str, matrix: torch.Tensor) -> None:
        set_weight_matrix(self.get_module(name), self.layers[name].kind, matrix)

    # -- measured state ------------------------------------------------------------------------
    def refresh_measured_sparsity(self) -> None:
        for name in self.layers:
            w = self.weight(name)
            self.plan[name].measured_sparsity = float((w == 0).sum().item()) / max(w.numel(), 1)

    def prunable_params(self) -> int:
        return sum(layer.params for layer in self.layers.values())

    def overall_sparsity(self) -> float:
        total = self.prunable_params()
        if not total:
            return 0.0
        return sum(p.measured_sparsity * p.params for p in self.plan.values()) / total

    def summary(self) -> dict[str, Any]:
        """A JSON-able view of structure + plan + analyses (used by --dump-ir and the manifest)."""
        return {
            "source": self.source,
            "model_type": self.model_type,
            "blocks": [{"index": b.index, "name": b.name, "layers": list(b.layers)} for b in self.blocks],
            "layers": {n: asdict(l) for n, l in self.layers.items()},
            "plan": {n: p.to_dict() for n, p in self.plan.items()},
            "analyses": jsonable(self.analyses),
        }

    def clone(self) -> "ModelIR":
        """Deep copy of module, plan and analyses (tokenizer/config shared: they are read-only)."""
        new = copy.copy(self)
        new.module = copy.deepcopy(self.module)
        new.plan = {k: copy.copy(v) for k, v in self.plan.items()}
        new.analyses = copy.deepcopy(self.analyses)
        return new


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return repr(value)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """Which prunable kind a module is, or None. GPT-2's Conv1D is matched by its class identity
    from transformers (not by name), so user classes called Conv1D are not mistaken for it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    return None


def weight_matrix(module: nn.Module, kind: LayerKind) -> torch.Tensor:
    """The weight as an (out, in) matrix. For conv1d it is a transposed *view*; use
    `set_weight_matrix` to write back."""
    w = module.weight.data
    if kind == "linear":
        return w
    if kind == "conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def set_weight_matrix(module: nn.Module, kind: LayerKind, matrix: torch.Tensor) -> None:
    w = module.weight.data
    matrix = matrix.to(dtype=w.dtype, device=w.device)
    if kind == "linear":
        w.copy_(matrix)
    elif kind == "conv1d":
        w.copy_(matrix.t())
    else:
        w.copy_(matrix.reshape(w.shape))


def matrix_shape(module: nn.Module, kind: LayerKind) -> tuple[int, int]:
    m = weight_matrix(module, kind)
    return int(m.shape[0]), int(m.shape[1])


def state_dict_sha256(module: nn.Module) -> str:
    """Identity of a model's weights: sha256 over its state dict (sorted keys, raw bytes). Keys the
    manifest's source hash and the dense reference cache."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()
