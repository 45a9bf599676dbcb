"""Verification of causal LMs through the decoders (runtimes/decode/decoders.py), on every backend — DeepSparse
included, whose engines need the fixed-shape graphs only the decoders build.

`measure_lm_backend` returns what `runtimes.measure.verify.measure_backend` returns, per configuration:
- accuracy: prefill logits of every accuracy row (its valid tokens) vs dense fp32 on the same backend;
- `prefill`: time to the first token at batch 1 (`seqlen` prompt tokens), interleaved over configurations;
- `decode`: `decode_tokens` greedy tokens after that prompt, `min(runs, 3)` interleaved rounds:
  per-step percentiles, tokens/s (median of the rounds), and whether the greedy tokens equal dense fp32's.
Causal LMs are timed at batch 1 whatever `batch_size` says (a note says so): decode is a batch-1 regime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtimes.decode.decoders import DecodeOptions, Decoder, open_decoder
from runtimes.measure.contention import ContentionMeter
from runtimes.measure.dense import COMPILED, DENSE
from runtimes.measure.idle_workers import IdleWorkers, worker_pids
from runtimes.measure.stats import compare_outputs, merge_accuracy, percentiles
from runtimes.measure.timing import cpu_clocks, paired_timing, plan_from, summary, worker_clocks

DECODE_ROUNDS = 5  # paired decode rounds: the fewest a speedup interval is computed from (speedup.MIN_ROUNDS)


def _rows(feeds: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(1, n) ids and mask of each row's valid tokens (right-padded batches)."""
    out = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"]):
        valid = mask.astype(bool)
        out.append((ids[valid][None, :], np.ones((1, int(valid.sum())), dtype=np.int64)))
    return out


def _accuracy(decoders: dict[str, Decoder], reference: str, inputs: Any, task: str) -> dict[str, dict[str, Any]]:
    parts: dict[str, list[dict[str, Any]]] = {label: [] for label in decoders if label != reference}
    for feeds, _ in inputs.accuracy:
        for ids, mask in _rows(feeds):
            ref = decoders[reference].prefill_logits(ids, mask)
            valid = np.ones(ref.shape[:2], dtype=bool)
            for label in parts:
                parts[label].append(compare_outputs(task, ref, decoders[label].prefill_logits(ids, mask), valid))
    return {label: merge_accuracy(p) for label, p in parts.items()}


def _decode_rounds(decoders: dict[str, Decoder], ids: np.ndarray, mask: np.ndarray, new_tokens: int,
                   rounds: int, threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Paired decode rounds. One statistic throughout: each round's median step time per configuration;
    tokens/s is 1000 / the median of those, and the speedup is the median of per-round ratios (a round
    with a stall moves both sides' medians alike instead of sinking one rate). The rounds run inside a
    ContentionMeter; every configuration carries its record (`contention`). The other configurations' worker
    processes are stopped during each one's turn (runtimes/measure/idle_workers.py)."""
    meter = ContentionMeter(threads, worker_clocks(cpu_clocks(decoders))).start()
    with IdleWorkers(worker_pids(decoders)) as idle:
        try:
            out = _paired_decode(decoders, ids, mask, new_tokens, rounds, idle)
        finally:
            record = meter.stop().to_dict()
    return {label: {**d, "contention": record, "idle_worker_stops": idle.stops} for label, d in out.items()}


def _paired_decode(decoders: dict[str, Decoder], ids: np.ndarray, mask: np.ndarray, new_tokens: int,
                   rounds: int, idle: IdleWorkers) -> dict[str, dict[str, Any]]:
    labels = list(decoders)
    steps: dict[str, list[float]] = {label: [] for label in labels}
    round_ms: dict[str, list[float]] = {label: [] for label in labels}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            idle.turn(label)
            trace = decoders[label].generate(ids, mask, new_tokens)
            steps[label] += trace.step_ms
            round_ms[label].append(float(np.median(trace.step_ms)) if trace.step_ms else 1e-9)
            tokens[label] = trace.tokens
    return {label: {**percentiles(steps[label] or [0.0]), "tokens_per_s": 1e3 / float(np.median(round_ms[label])),
                    "rounds_ms": [round(v, 4) for v in round_ms[label]],
                    "new_tokens": new_tokens, "tokens": tokens[label]} for label in labels}


def measure_lm_backend(backend: Any, configs: dict[str, Path], lowering: dict[str, Any], inputs: Any, opts: Any,
                       workdir: Path) -> dict[str, Any]:
    ids, mask = _rows({k: v[:1] for k, v in inputs.timing.items()})[0]
    dopts = DecodeOptions(prompt_len=inputs.seqlen, new_tokens=opts.decode_tokens, threads=opts.threads)
    decoders: dict[str, Decoder] = {}
    try:
        for label, path in configs.items():
            decoders[label] = open_decoder(backend, path, lowering, dopts, Path(workdir) / label.replace(" ", "_"))
        accuracy = _accuracy(decoders, DENSE, inputs, lowering["task"])
        series = paired_timing({label: (lambda d=d: d.generate(ids, mask, 1)) for label, d in decoders.items()},
                               plan_from(opts), pairs=[(DENSE, COMPILED)], cpu_clocks=cpu_clocks(decoders),
                               threads=opts.threads, workers=worker_pids(decoders))
        decode = _decode_rounds(decoders, ids, mask, opts.decode_tokens, DECODE_ROUNDS, opts.threads) \
            if opts.decode else {}
        for d in decode.values():
            d["same_tokens_as_dense"] = d["tokens"] == decode[DENSE]["tokens"]
        if opts.batch_size > 1 and "causal LMs are timed at batch 1" not in inputs.notes:
            inputs.notes.append("causal LMs are timed at batch 1 (prefill and decode)")
        return {"configs": {label: {"file": configs[label], "prefill": summary(series, label),
                                    **({"accuracy": accuracy[label]} if label in accuracy else {}),
                                    **({"decode": decode[label]} if label in decode else {}),
                                    "details": decoders[label].details} for label in decoders},
                "timing": series.to_dict()}
    finally:
        for d in decoders.values():
            d.close()
