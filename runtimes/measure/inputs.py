"""What verification and benchmarks feed the models: options, and fixed-shape inputs of real held-out text
(seeded random feeds for plain modules)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import SparsecError
from compiler.lowering.feeds import graph_feeds, long_texts, text_batch
from runtimes.base import RunnerOptions


@dataclass(frozen=True)
class VerifyOptions:
    batch_size: int = 1
    seqlen: int = 128
    threads: int = 2
    runs: int = 20
    warmup: int = 3
    min_speedup: float | None = None
    max_accuracy_drop: float | None = None
    accuracy_batches: int = 4
    decode: bool = True  # causal LMs: also time greedy decode of `decode_tokens` tokens after `seqlen` tokens
    decode_tokens: int = 32
    cache_dir: str | None = None
    # paired rounds continue past `runs` until the speedup interval is narrower than `target_width` of its
    # estimate, or `max_rounds` / `time_budget_s` is spent (runtimes/measure/timing.py);
    # $SPARSEC_TIME_BUDGET_S sets the default budget (the test suite bounds it: Makefile `test`)
    target_width: float = 0.10
    max_rounds: int = 200
    time_budget_s: float = field(default_factory=lambda: float(os.environ.get("SPARSEC_TIME_BUDGET_S", "30")))

    def __post_init__(self) -> None:
        RunnerOptions(threads=self.threads, batch_size=self.batch_size, seqlen=self.seqlen)  # validates > 0
        if self.runs <= 0 or self.warmup < 0 or self.accuracy_batches <= 0 or self.decode_tokens <= 0:
            raise SparsecError(f"runs, accuracy batches and decode tokens must be > 0, warm-up >= 0 (got runs={self.runs}, "
                               f"warmup={self.warmup}, accuracy_batches={self.accuracy_batches}, "
                               f"decode_tokens={self.decode_tokens})")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "VerifyOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (options or {}).items() if k in names and v is not None})

    def runner_options(self) -> RunnerOptions:
        return RunnerOptions(threads=self.threads, batch_size=self.batch_size, seqlen=self.seqlen)


@dataclass
class InputSet:
    """Fixed-shape feeds: one batch for timing, a few for accuracy (valid-token masks alongside)."""

    timing: dict[str, np.ndarray]
    accuracy: list[tuple[dict[str, np.ndarray], np.ndarray | None]]
    seqlen: int
    notes: list[str] = field(default_factory=list)


def load_tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    for sub in ("onnx", "model"):
        d = root / sub
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            return tok
    return None


def max_positions(root: Path) -> int | None:
    cfg = root / "model" / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text(encoding="utf-8"))
    values = [data[k] for k in ("max_position_embeddings", "n_positions") if isinstance(data.get(k), int)]
    return min(values) if values else None


def build_inputs(root: Path, lowering: dict[str, Any], opts: VerifyOptions, text_source: str = "eval") -> InputSet:
    notes = []
    seqlen = opts.seqlen
    limit = max_positions(root)
    if limit and seqlen > limit:
        notes.append(f"seqlen capped from {seqlen} to the model's {limit} positions")
        seqlen = limit
    if lowering["task"] == "text-generation" and opts.decode and limit and seqlen + opts.decode_tokens > limit:
        seqlen = max(1, limit - opts.decode_tokens)  # room for the decoded tokens
    tokenizer = load_tokenizer(root)
    if lowering["task"] == "module" or tokenizer is None:
        return _random_inputs(root, lowering, opts, seqlen, notes)
    from compiler.calibration import load_texts

    texts = long_texts(load_texts(text_source), min_chars=seqlen * 8)
    batches = []
    for k in range(opts.accuracy_batches):
        chunk = texts[(k * opts.batch_size) % len(texts):][: opts.batch_size] or texts[: opts.batch_size]
        ids, mask = text_batch(tokenizer, chunk, opts.batch_size, seqlen)
        batches.append((graph_feeds(lowering, ids, mask), mask.astype(bool)))
    return InputSet(timing=batches[0][0], accuracy=batches, seqlen=seqlen, notes=notes)


def _random_inputs(root: Path, lowering: dict[str, Any], opts: VerifyOptions, seqlen: int, notes: list[str]) -> InputSet:
    """Plain modules have no tokenizer: seeded random feeds shaped like the graph's inputs."""
    import onnx

    model = onnx.load(str(root / lowering["files"]["model"]), load_external_data=False)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(opts.accuracy_batches):
        feeds = {}
        for inp in model.graph.input:
            t = inp.type.tensor_type
            shape = [opts.batch_size if i == 0 else (d.dim_value or seqlen) for i, d in enumerate(t.shape.dim)]
            np_type = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            feeds[inp.name] = (rng.integers(0, 2, size=shape) if np.issubdtype(np_type, np.integer)
                               else rng.standard_normal(size=shape)).astype(np_type)
        batches.append((feeds, None))
    notes.append("no tokenizer: random inputs shaped like the graph's")
    return InputSet(timing=batches[0][0], accuracy=batches, seqlen=seqlen, notes=notes)
