"""torch → ONNX export of one model (the pure export step of `compiler.lowering`).

Three graph kinds, chosen from `ModelIR.model_type`:
- encoders (`feature-extraction`, or `text-classification` for sequence classifiers): inputs
  `input_ids`, `attention_mask` (+ `token_type_ids` when the model's forward takes them), output
  `last_hidden_state` (or `logits`); dynamic axes batch + sequence.
- causal LMs (`text-generation`): one graph with KV cache in optimum's naming — inputs `input_ids`,
  `attention_mask`, `position_ids`, `past_key_values.{i}.key/value`; outputs `logits`,
  `present.{i}.key/value`. The same graph does prefill (past length 0) and decode (one token).
- plain modules (`module`): the factory's example inputs by name, outputs `output[_i]`; dynamic batch.

All exports use the TorchScript exporter (`torch.onnx.export(dynamo=False)`, IR 8, which DeepSparse
can load) in eval mode; constant folding only transposes weights, so the exact zeros of pruned
weights stay exact zeros in the initializers. Choices made for the runtimes (measured on MiniLM):
- the graph declares opset 17 but is exported at opset 16, so LayerNorm stays decomposed
  (ReduceMean/Sub/Pow/Sqrt/Div): DeepSparse 1.8 has no LayerNormalization kernel (supported-op
  fraction 0.89 → 0.98), onnxruntime and OpenVINO fuse the pattern back (no slower: ORT 170 vs 180 ms,
  OV 65 vs 73 ms under load). Opset 17 only *added* operators, so the graph is valid opset 17;
- attention is exported from the model's `eager` implementation (plain MatMul/Softmax, no SDPA
  NaN guards), restored afterwards;
- encoders get the additive 4-D mask `(1 − mask) · min(float32)` built in the wrapper when the model
  accepts it and it reproduces the 2-D-mask outputs exactly (checked at export): the graph then has no
  mask-construction subgraph (Range/And/Where), which DeepSparse cannot run.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compiler.cache_api import cache_kwargs, output_cache
from compiler.ir import ModelIR
from compiler.lowering.format import OPSET, LoweringError, load_onnx

EXPORT_OPSET = 16  # what the exporter targets (see the module docstring)
EXTERNAL_DATA_BYTES = int(1.5 * 2**30)
EXTERNAL_DATA_FILE = "model.onnx.data"
TASKS = {"encoder": "feature-extraction", "sequence-classification": "text-classification",
         "causal-lm": "text-generation", "module": "module"}


@dataclass(frozen=True)
class KVSpec:
    """Shape of the KV cache of a causal-LM graph: (batch, kv_heads, past_len, head_dim) per tensor."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """What a lowered graph looks like: task, input/output names, dynamic axes, KV cache layout."""

    task: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    kv: KVSpec | None = None


def task_of(ir: ModelIR) -> str:
    if ir.model_type not in TASKS:
        raise LoweringError(f"lowering to ONNX supports encoders, causal LMs and plain modules, not '{ir.model_type}' models")
    return TASKS[ir.model_type]


def _forward_params(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return set()


# -- encoders ------------------------------------------------------------------------------------
class _EncoderWrapper(nn.Module):
    def __init__(self, model: nn.Module, input_names: tuple[str, ...], output: str, additive_mask: bool = False):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output = output
        self.additive_mask = additive_mask

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, args))
        if self.additive_mask:
            mask = kwargs["attention_mask"][:, None, None, :].to(torch.float32)
            kwargs["attention_mask"] = (1.0 - mask) * torch.finfo(torch.float32).min
        return getattr(self.model(**kwargs), self.output)


def _accepts_additive_mask(ir: ModelIR, spec: "GraphSpec", dummy: tuple[torch.Tensor, ...]) -> bool:
    """Does the encoder give the same outputs with the 4-D additive mask as with the 2-D mask?"""
    plain = _EncoderWrapper(ir.module, spec.inputs, spec.outputs[0])
    additive = _EncoderWrapper(ir.module, spec.inputs, spec.outputs[0], additive_mask=True)
    try:
        with torch.no_grad():
            ref, got = plain(*dummy), additive(*dummy)
    except Exception:  # noqa: BLE001 - a model that rejects 4-D masks keeps the 2-D path
        return False
    valid = dummy[spec.inputs.index("attention_mask")].bool()
    return ref.shape == got.shape and bool(torch.allclose(ref[valid], got[valid], atol=1e-5, rtol=1e-4)) \
        if ref.dim() >= 2 and ref.shape[:2] == valid.shape else bool(torch.allclose(ref, got, atol=1e-5, rtol=1e-4))


@contextlib.contextmanager
def _eager_attention(module: nn.Module):
    """Export from the model's eager attention (when it has one); restore its choice afterwards."""
    config = getattr(module, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(module, "set_attn_implementation")
    if switch:
        try:
            module.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 - a model without an eager path keeps its own
            switch = False
    try:
        yield
    finally:
        if switch:
            module.set_attn_implementation(previous)


def encoder_spec(ir: ModelIR) -> GraphSpec:
    task = task_of(ir)
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in _forward_params(ir.module):
        names.append("token_type_ids")
    output = "logits" if task == "text-classification" else "last_hidden_state"
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes[output] = {0: "batch_size"} if output == "logits" else {0: "batch_size", 1: "sequence_length"}
    return GraphSpec(task, tuple(names), (output,), axes)


def _encoder_dummy(spec: GraphSpec, vocab: int) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(low=min(3, vocab - 1), high=vocab, size=(2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(by_name[n] for n in spec.inputs)


# -- causal LMs ----------------------------------------------------------------------------------
class _CausalLMWrapper(nn.Module):
    """Flat tensors in, flat tensors out: builds a DynamicCache from `past_key_values.*`."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **cache_kwargs(self.model, cache))
        flat = []
        for layer in output_cache(out).layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def kv_spec(module: nn.Module) -> KVSpec:
    """Read the KV layout from one real forward pass (no architecture names involved)."""
    with torch.no_grad():
        out = module(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    cache = output_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        raise LoweringError(f"causal LM {type(module).__name__} returns no per-layer KV cache "
                            f"(got {type(cache).__name__}): only DynamicCache-style models lower with KV cache")
    keys = layers[0].keys
    if any(lay.keys.shape[1:] != keys.shape[1:] or lay.values.shape != lay.keys.shape for lay in layers):
        raise LoweringError(f"{type(module).__name__}: KV tensors differ between layers (hybrid cache): not supported")
    return KVSpec(layers=len(layers), kv_heads=int(keys.shape[1]), head_dim=int(keys.shape[3]))


def causal_lm_spec(ir: ModelIR) -> GraphSpec:
    kv = kv_spec(ir.module)
    past = [f"past_key_values.{i}.{t}" for i in range(kv.layers) for t in ("key", "value")]
    present = [f"present.{i}.{t}" for i in range(kv.layers) for t in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present})
    return GraphSpec("text-generation", ("input_ids", "attention_mask", "position_ids", *past),
                     ("logits", *present), axes, kv)


def _causal_dummy(spec: GraphSpec, vocab: int) -> tuple[torch.Tensor, ...]:
    kv = spec.kv
    batch, seq, past_len = 2, 5, 3
    ids = torch.randint(low=min(3, vocab - 1), high=vocab, size=(batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).unsqueeze(0).expand(batch, -1).contiguous()
    past = [torch.randn(batch, kv.kv_heads, past_len, kv.head_dim) for _ in range(2 * kv.layers)]
    return (ids, mask, pos, *past)


# -- plain modules -------------------------------------------------------------------------------
class _ModuleWrapper(nn.Module):
    def __init__(self, model: nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *args: torch.Tensor):
        if self.input_names == ("input",):
            out = self.model(args[0])
        else:
            out = self.model(**dict(zip(self.input_names, args)))
        return tuple(_flat_tensors(out))


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def module_spec(ir: ModelIR) -> GraphSpec:
    if not ir.example_inputs:
        raise LoweringError("a plain module needs example inputs to be lowered")
    names = tuple(ir.example_inputs)
    with torch.no_grad():
        outs = _flat_tensors(_ModuleWrapper(ir.module, names)(*ir.example_inputs.values()))
    if not outs:
        raise LoweringError(f"{type(ir.module).__name__} returns no tensors: nothing to lower")
    out_names = ("output",) if len(outs) == 1 else tuple(f"output_{i}" for i in range(len(outs)))
    axes = {n: {0: "batch_size"} for n in (*names, *out_names)}
    return GraphSpec("module", names, out_names, axes)


# -- export --------------------------------------------------------------------------------------
def graph_spec(ir: ModelIR) -> GraphSpec:
    task = task_of(ir)
    if task == "text-generation":
        return causal_lm_spec(ir)
    if task == "module":
        return module_spec(ir)
    return encoder_spec(ir)


def _wrapper_and_dummy(ir: ModelIR, spec: GraphSpec, additive_mask: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    vocab = int(getattr(ir.config, "vocab_size", 0) or 100)
    if spec.task == "text-generation":
        return _CausalLMWrapper(ir.module, spec.kv.layers), _causal_dummy(spec, vocab)
    if spec.task == "module":
        return _ModuleWrapper(ir.module, spec.inputs), tuple(ir.example_inputs.values())
    return _EncoderWrapper(ir.module, spec.inputs, spec.outputs[0], additive_mask), _encoder_dummy(spec, vocab)


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def export_onnx(ir: ModelIR, path: Path, spec: GraphSpec | None = None) -> GraphSpec:
    """Export `ir.module` (fp32) to `path`; weights go to `model.onnx.data` beside it when the model
    is larger than 1.5 GB. Returns the graph spec. The module is left in eval mode."""
    spec = spec or graph_spec(ir)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = param_bytes(ir.module) > EXTERNAL_DATA_BYTES
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        with _eager_attention(ir.module), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
            wrapper, dummy = _wrapper_and_dummy(ir, spec)
            if spec.task in ("feature-extraction", "text-classification") and _accepts_additive_mask(ir, spec, dummy):
                wrapper, dummy = _wrapper_and_dummy(ir, spec, additive_mask=True)
            wrapper.eval()  # the exporter restores the wrapper's mode afterwards, recursively
            torch.onnx.export(wrapper, dummy, str(tmp / path.name), dynamo=False, opset_version=EXPORT_OPSET,
                              input_names=list(spec.inputs), output_names=list(spec.outputs),
                              dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
        model = load_onnx(tmp / path.name)
        declare_opset(model, OPSET)
        save_onnx(model, path, external=big)
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything; keep the message
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise LoweringError(f"torch.onnx.export failed for {type(ir.module).__name__}: {type(exc).__name__}: {first}") from exc
    finally:
        ir.module.eval()
        shutil.rmtree(tmp, ignore_errors=True)
    return spec


def declare_opset(model: Any, version: int) -> None:
    """Stamp the default-domain opset (valid upward from 16 to 17: opset 17 only added operators)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = version


def save_onnx(model: Any, path: Path, external: bool | None = None, data_file: str = EXTERNAL_DATA_FILE) -> None:
    """Save an ONNX model; its weights go to `data_file` (`model.onnx.data`) beside it above 1.5 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def torch_outputs(ir: ModelIR, spec: GraphSpec, feeds: dict[str, Any]) -> dict[str, Any]:
    """Run the torch model on numpy feeds through the same wrapper the export used."""
    wrapper, _ = _wrapper_and_dummy(ir, spec)
    args = [torch.from_numpy(feeds[n]) for n in spec.inputs]
    with torch.no_grad():
        out = wrapper(*args)
    out = out if isinstance(out, tuple) else (out,)
    return {n: t.detach().float().numpy() for n, t in zip(spec.outputs, out)}
