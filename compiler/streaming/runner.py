"""Open a model for compiling or evaluating, streamed or in memory, and say why.

`decide` sizes the checkpoint from its safetensors headers and compares the in-memory footprint with
the memory this compile may use (the smaller of `--max-memory` and MemAvailable); `--stream` /
`--no-stream` force the mode. `open_streamed` builds the model on the meta device, finds the blocks,
loads the outer part, and traces the execution order with one forward pass of a short example input
(each block loaded in turn): the same `trace` as in memory, so blocks, layers and their order match.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from compiler.errors import ModelLoadError, SpecError
from compiler.ir import ModelIR
from compiler.streaming.index import INDEX_FILE, SINGLE_FILE, CheckpointIndex
from compiler.streaming.memory import BASELINE, GIB, Shape, available_memory, chunk_tokens
from compiler.streaming.streamed_ir import StreamedIR

COMPUTE_DTYPE = torch.float32  # what the in-memory mode loads (compiler.trace.load_model)


@dataclass(frozen=True)
class ModeDecision:
    stream: bool
    reason: str
    path: Path | None
    in_memory_bytes: int | None = None
    budget_bytes: int | None = None
    max_memory: int | None = None

    def to_dict(self) -> dict[str, Any]:
        gib = (lambda v: None if v is None else round(v / GIB, 3))
        return {"streamed": self.stream, "reason": self.reason, "in_memory_estimate_gib": gib(self.in_memory_bytes),
                "budget_gib": gib(self.budget_bytes), "max_memory_gib": gib(self.max_memory)}


def local_checkpoint(model: str) -> Path | None:
    """The local HF directory with safetensors weights behind MODEL, or None."""
    from compiler.trace import resolve_model_path

    try:
        path = Path(resolve_model_path(model))
    except ModelLoadError:
        return None
    if path.is_dir() and (path / "config.json").is_file() and ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()):
        return path
    return None


def decide(model: str, stream: bool | None, max_memory: int | None, copies: int = 1, samples: int = 0,
           seqlen: int = 0) -> ModeDecision:
    """Stream when forced, or when `copies` fp32 copies of the model plus the calibration activations
    (2 x samples x seqlen x hidden x 4 bytes) and the baseline exceed the budget."""
    path = local_checkpoint(model)
    if stream is False:
        return ModeDecision(False, "--no-stream", path, max_memory=max_memory)
    if path is None:
        if stream:
            raise SpecError(f"--stream needs a local Hugging Face directory with safetensors weights; '{model}' is not one")
        return ModeDecision(False, "not a local safetensors checkpoint", None, max_memory=max_memory)
    index = CheckpointIndex.from_dir(path)
    activations = 2 * samples * seqlen * 4 * config_width(path)
    need = copies * index.nbytes(COMPUTE_DTYPE) + activations + BASELINE
    budget = min(available_memory(), max_memory) if max_memory else available_memory()
    if stream:
        return ModeDecision(True, "--stream", path, need, budget, max_memory)
    if need > budget:
        return ModeDecision(True, f"in-memory estimate {need / GIB:.2f} GiB > budget {budget / GIB:.2f} GiB", path, need, budget, max_memory)
    return ModeDecision(False, f"in-memory estimate {need / GIB:.2f} GiB fits the budget {budget / GIB:.2f} GiB", path, need, budget, max_memory)


def config_width(path: Path) -> int:
    """The hidden size in config.json (read as JSON: no model class needed to size the activations)."""
    import json

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 1024)


def open_streamed(path: Path | None, source: str, dtype: torch.dtype = COMPUTE_DTYPE, work_dir: Path | None = None,
                  structure: ModelIR | None = None, check: Callable[[Any, Any], None] | None = None) -> StreamedIR:
    """A StreamedIR over the checkpoint at `path`. `structure`: an IR of the same checkpoint whose
    blocks and layers are reused (a dense copy needs no second trace). `check(residency, config)` runs
    once the blocks are known and before the trace reads them (the --max-memory check)."""
    from transformers import AutoConfig

    from compiler.streaming.meta_model import build_meta_model
    from compiler.streaming.residency import Residency
    from compiler.trace import LoadedModel, find_block_container, hf_example_inputs, hf_task, own_tokenizer, trace

    if path is None:
        raise ModelLoadError(f"'{source}' is not a local safetensors checkpoint: it cannot be streamed")
    index = CheckpointIndex.from_dir(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    task = hf_task(config)
    module = build_meta_model(config, task, dtype)
    if structure is not None:
        names = [b.name for b in structure.blocks]
        tokenizer, example = structure.tokenizer, structure.example_inputs
    else:
        from compiler.ir import layer_kind

        prunable = {n: m for n, m in module.named_modules() if n and layer_kind(m)}
        _, names = find_block_container(module, prunable)
        tokenizer = own_tokenizer(str(path), {"local_files_only": True})
        example = hf_example_inputs(config, tokenizer)
    res = Residency(index, module, names, dtype, work_dir)
    if check is not None:
        check(res, config)
    if structure is not None:
        blocks, layers = structure.blocks, structure.layers
    else:
        traced = trace(LoadedModel(module, task, config, tokenizer, example, path), source)
        blocks, layers = traced.blocks, traced.layers
        res.evict_all()
    return StreamedIR(module=module, blocks=blocks, layers=layers, source=source, model_type=task, config=config,
                      tokenizer=tokenizer, example_inputs=example, source_dir=path, stream=res, reopen=_dense_copy)


def _dense_copy(ir: StreamedIR) -> StreamedIR:
    """A second StreamedIR over the same checkpoint, without the overlay: the dense model."""
    return open_streamed(ir.source_dir, ir.source, ir.residency.dtype, None, structure=ir)


def load_ir(model: str, decision: ModeDecision, work_parent: Path | None = None, samples: int = 0, seqlen: int = 0) -> ModelIR:
    """The IR in the decided mode. Streamed: a work directory for changed blocks beside `work_parent`
    (the artifact's parent: same filesystem, so finished shards are moved, not copied) and, under
    --max-memory, the tokens per block call that fit it."""
    from compiler.trace import load_and_trace

    if not decision.stream:
        return load_and_trace(model)
    work = None
    if work_parent is not None:
        work_parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".sparsec-stream-", dir=work_parent))
    from compiler.block_batching import DEFAULT_MAX_TOKENS

    sized: dict[str, Any] = {}

    def check(res: Any, config: Any) -> None:
        fixed = res.block_bytes() + res.outer_bytes() + BASELINE
        sized["budget"] = chunk_tokens(decision.max_memory, fixed, samples, seqlen, Shape.of(config), DEFAULT_MAX_TOKENS) if samples else None

    try:
        ir = open_streamed(decision.path, model, COMPUTE_DTYPE, work, check=check)
    except BaseException:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    res = ir.residency
    budget = sized["budget"]
    ir.batch_tokens = budget.chunk_tokens if budget and decision.max_memory else None
    ir.info = {**decision.to_dict(), "blocks_streamed": len(res.block_names),
               "block_gib": round(res.block_bytes() / GIB, 3), "outer_gib": round(res.outer_bytes() / GIB, 3),
               "disk_dtypes": res.index.disk_dtypes(), "batch_tokens": ir.batch_tokens,
               "streamed_estimate_gib": round(budget.total(Shape.of(ir.config), seqlen) / GIB, 3) if budget else None}
    return ir
