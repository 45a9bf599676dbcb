"""Memory: what is available, what a compile needs in each mode, and the peak resident set.

The estimates (docs/streaming.md, "Memory estimate"), in bytes, with c = bytes of the compute dtype:
- in memory: all parameters × c, twice when a dense copy is kept (evaluation, lowering, recovery),
  plus the calibration activations;
- streamed: the largest block × c + everything outside the blocks (embeddings, final norm, head) × c
  + 2 × samples × seqlen × hidden × 4 (one block's inputs and outputs for every sample)
  + one chunk's working set (tokens × (6·hidden + 3·intermediate + heads·seqlen) × 4)
  + BASELINE (the interpreter, torch and transformers, measured ≈ 0.6 GiB).
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass

from compiler.errors import SpecError

GIB = 1 << 30
BASELINE = int(0.6 * GIB)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": GIB, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB', '8G', '7.5gb', '1024MiB' -> bytes (a bare number is bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SpecError(f"--max-memory must be a size such as 8GiB or 512MiB, got '{text}'")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise SpecError(f"--max-memory must be > 0, got '{text}'")
    return value


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (psutil where there is no /proc)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def peak_rss() -> int:
    """Peak resident set of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss()


@dataclass(frozen=True)
class Shape:
    """What the estimates need from a model config."""

    hidden: int
    intermediate: int
    heads: int

    @classmethod
    def of(cls, config) -> "Shape":
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or getattr(config, "d_model", 0) or 1024)
        inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or getattr(config, "ffn_dim", 0) or 4 * hidden)
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 16)
        return cls(hidden, inter, heads)

    def token_working_bytes(self, seqlen: int) -> int:
        return 4 * (6 * self.hidden + 3 * self.intermediate + self.heads * seqlen)


@dataclass(frozen=True)
class StreamBudget:
    fixed: int  # largest block + outer parts + baseline
    activations: int  # 2 x samples x seqlen x hidden x 4
    chunk_tokens: int  # tokens per block call that fit what is left

    def total(self, shape: Shape, seqlen: int) -> int:
        return self.fixed + self.activations + self.chunk_tokens * shape.token_working_bytes(seqlen)


def chunk_tokens(cap: int | None, fixed: int, samples: int, seqlen: int, shape: Shape, default: int) -> StreamBudget:
    """Tokens per block call under `cap` (None: the default chunk). Fails with a one-line error when
    even one sample per call would not fit."""
    activations = 2 * samples * seqlen * shape.hidden * 4
    if cap is None:
        return StreamBudget(fixed, activations, default)
    room = cap - fixed - activations
    per_token = shape.token_working_bytes(seqlen)
    tokens = min(default, room // per_token) if room > 0 else 0
    if tokens < seqlen:
        need = fixed + activations + seqlen * per_token
        raise SpecError(f"--max-memory {cap / GIB:.2f} GiB is below the streamed estimate for one sample per call "
                        f"({need / GIB:.2f} GiB: block + outer weights {fixed / GIB:.2f}, activations {activations / GIB:.2f})")
    return StreamBudget(fixed, activations, int(tokens // seqlen * seqlen))
