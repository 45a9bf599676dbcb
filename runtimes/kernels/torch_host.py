"""Run a whole Hugging Face model with sparsec's packed kernels, hosted by torch.

`load_host_model(ART)` builds the model class named by ART/model/config.json without initialising
any weight (parameters are empty, untouched allocations), swaps every packed layer of
ART/sparsec/weights.safetensors in as a PackedLinearModule, and then reads from the model's
safetensors only the tensors of the layers that stayed ordinary (embeddings, norms, attention
layers left dense): the dense matrix of a packed layer is never read or built. Decode keeps
transformers' own generation loop and KV cache (`generate`), encoders return hidden states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtimes.kernels.format import load_packed
from runtimes.kernels.modules import PackedLinearModule
from runtimes.kernels.pack import PACKED_DIR, WEIGHTS, model_class


@dataclass
class HostModel:
    """A torch model whose planned layers run on the sparsec kernels."""

    model: nn.Module
    causal: bool
    # HF layer name -> its packed module (a PackedLinearModule, or a FusedMember of a fused q/k/v or gate/up op)
    packed: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None

    def reset_counters(self) -> None:
        for m in self.packed.values():
            m.calls = 0
        for k in self.kernels():
            k.calls = 0

    def layers_run(self) -> dict[str, str]:
        """name -> kind of every packed layer that ran since the last reset (the sparse-kernel proof). A fused
        member counts when the fused op ran: the lean decoder host calls the fused kernel, not its members."""
        return {n: m.kind for n, m in self.packed.items()
                if m.calls > 0 or (hasattr(m, "kernel") and m.kernel().calls > 0)}

    def kernels(self) -> list[PackedLinearModule]:
        """The packed ops the model runs, each once (a fused op serves several layers)."""
        seen: dict[int, PackedLinearModule] = {}
        for m in self.packed.values():
            k = m.kernel() if hasattr(m, "kernel") else m
            seen.setdefault(id(k), k)
        return list(seen.values())

    def packed_bytes(self) -> int:
        return sum(sum(b.numel() * b.element_size() for b in m.buffers() if b is not None) for m in self.kernels())

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy decode with transformers' loop and KV cache."""
        if not self.causal:
            raise ValueError("error: generate needs a causal LM; this model is an encoder")
        return self.model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=getattr(self.model.config, "pad_token_id", None) or 0, **kwargs)

    @torch.inference_mode()
    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)


def _empty_model(model_dir: Path):
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(model_dir))
    cls = model_class(config)
    with no_init_weights():
        model = cls._from_config(config, dtype=torch.float32) if hasattr(cls, "_from_config") else cls(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # no_init_weights skips post-init tying: tie before any layer is swapped
    model.eval()
    return model, config


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"error: '{model_dir}' holds no model.safetensors")
    return [single]


def swap_in(model: nn.Module, packed_layers: dict[str, Any], fuse: bool | None = None) -> dict[str, Any]:
    """Replace each named layer of `model` by a PackedLinearModule of its packed form; sibling q/k/v and
    gate/up layers share one fused op (runtimes/kernels/fuse.py) unless `fuse` is False (default: on
    unless SPARSEC_FUSE=0)."""
    from runtimes.kernels.fuse import FusedMember, FusedPackedLinear, fuse_groups, fusion_enabled

    modules: dict[str, Any] = {}
    for name in packed_layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not hasattr(parent, child):
            raise ValueError(f"error: packed layer '{name}' does not exist in {type(model).__name__}")
    for names, fused_weight in fuse_groups(packed_layers) if (fusion_enabled() if fuse is None else fuse) else []:
        fused = FusedPackedLinear(fused_weight, [packed_layers[n].out_features for n in names])
        for i, name in enumerate(names):
            p = packed_layers[name]
            modules[name] = FusedMember(fused, i, p.kind, p.in_features, p.out_features)
    for name, p in packed_layers.items():
        if name not in modules:
            modules[name] = PackedLinearModule(p)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, modules[name])
    return modules


def load_host_model(artifact: str | Path, packed_path: str | Path | None = None, *, threads: int | None = None,
                    fuse: bool | None = None) -> HostModel:
    """The artifact's model with its packed layers on the sparsec kernels (see module docstring);
    `fuse`: one op for q/k/v and gate/up (default: on unless SPARSEC_FUSE=0)."""
    from safetensors import safe_open

    root = Path(artifact)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"error: artifact '{root}' has no Hugging Face model/ directory")
    weights = Path(packed_path) if packed_path is not None else root / PACKED_DIR / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"error: '{weights}' not found: pack the artifact first (runtimes.kernels.pack)")
    if threads:
        torch.set_num_threads(threads)
    packed_layers = load_packed(weights)
    model, config = _empty_model(model_dir)

    modules = swap_in(model, packed_layers, fuse)

    # every remaining parameter / persistent buffer, by name; tied tensors are filled once
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update({n: b for n, b in model.named_buffers(remove_duplicate=False)
                    if not any(n.startswith(p + ".") for p in modules)})
    filled: set[int] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if any(key.startswith(p + ".") for p in modules):
                    continue  # a packed layer's dense weight: never read
                target = targets.get(key)
                if target is None:
                    continue
                with torch.no_grad():
                    target.copy_(f.get_tensor(key).to(target.dtype))
                filled.add(target.data_ptr())
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() not in filled]
    if missing:
        raise ValueError(f"error: the artifact's model/ lacks {len(missing)} parameter(s), e.g. {missing[0]}")
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # noqa: BLE001 - a model without a tokenizer still runs on ids
        tokenizer = None
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    del packed_layers
    release_freed_memory()
    return HostModel(model, causal, modules, tokenizer)


def release_freed_memory() -> None:
    """Hand the heap freed while loading back to the OS (glibc's malloc_trim; a no-op elsewhere). Fusing
    q/k/v and gate/up copies each group once and frees the per-layer arrays; glibc keeps such freed blocks
    (its mmap threshold rises to 32 MiB after the first large free), which on SmolLM2 70 % int8 held ~35 MiB
    beyond the weights (benchmarks/kernels_memory.py)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
