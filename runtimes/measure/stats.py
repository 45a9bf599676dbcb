"""Pure measurement helpers shared by verification, benchmarks and decode measurement: percentiles,
interleaved timing, output comparison (numpy only)."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": int(a.size)}


def interleaved_timing(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Warm every call up, then time them round-robin for `runs` rounds, rotating the order each
    round (A B C, B C A, C A B, ...); returns milliseconds per call name."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def compare_outputs(task: str, ref: np.ndarray, got: np.ndarray, valid: np.ndarray | None) -> dict[str, Any]:
    """Accuracy of `got` against `ref` (first graph output): cosine (mean-pooled embeddings for
    encoders, per position for LMs), token/position cosine, max |Δ| over valid tokens, top-1 for LMs."""
    ref = ref.astype(np.float32)
    got = got.astype(np.float32)
    if valid is None or ref.ndim < 3:
        flat_r, flat_g = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
        cos = cosines(flat_r, flat_g)
        return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                "max_abs_diff": float(np.abs(flat_r - flat_g).max())}
    tok_cos = cosines(ref, got)[valid]
    out = {"token_cosine": float(tok_cos.mean()), "min_cosine": float(tok_cos.min()),
           "max_abs_diff": float(np.abs(ref - got)[valid].max())}
    if task == "text-generation":
        out["cosine"] = out["token_cosine"]
        out["top1_agreement"] = float((ref.argmax(-1) == got.argmax(-1))[valid].mean())
    else:
        w = valid[..., None].astype(np.float64)
        pooled_r = (ref * w).sum(1) / np.maximum(w.sum(1), 1)
        pooled_g = (got * w).sum(1) / np.maximum(w.sum(1), 1)
        out["cosine"] = float(cosines(pooled_r, pooled_g).mean())
    return out


def merge_accuracy(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of the mean metrics, min of the minima, max of the maxima over batches."""
    out: dict[str, Any] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        out[key] = min(values) if key.startswith("min") else max(values) if key.startswith("max") else float(np.mean(values))
    return out


def tokens_per_s(trace: Any) -> float:
    """Decode steps per second of a `DecodeTrace` (the first token comes from the prefill, not counted)."""
    total = sum(trace.step_ms)
    return len(trace.step_ms) / total * 1e3 if total > 0 else 0.0
