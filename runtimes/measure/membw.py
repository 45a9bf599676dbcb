"""A small streaming-read probe of the machine's memory bandwidth.

Decode of a causal LM reads every weight once per generated token, so tokens/s × weight bytes per
token ÷ this bandwidth says how close a configuration is to the physical limit. The probe sums a
buffer much larger than the last-level cache with the same thread count the backends use and
reports the best of several passes (reads only; the sum is kept so the work is not optimised away).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BandwidthResult:
    bytes_per_pass: int
    threads: int
    passes: int
    best_gbps: float
    median_gbps: float

    def to_dict(self) -> dict[str, float | int]:
        return {"bytes_per_pass": self.bytes_per_pass, "threads": self.threads, "passes": self.passes,
                "best_gbps": round(self.best_gbps, 2), "median_gbps": round(self.median_gbps, 2)}


def measure_read_bandwidth(size_mib: int = 512, threads: int = 2, passes: int = 7) -> BandwidthResult:
    """Streaming-read bandwidth in GB/s (10^9 bytes/s) over a `size_mib` MiB float32 buffer."""
    import statistics

    import torch

    if size_mib <= 0 or threads <= 0 or passes <= 0:
        raise ValueError("size_mib, threads and passes must be > 0")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_mib * (1 << 20) // 4, dtype=torch.float32)
        nbytes = buf.numel() * 4
        float(buf.sum())  # touch every page once before timing
        rates = []
        for _ in range(passes):
            start = time.perf_counter()
            float(buf.sum())
            rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(previous)
    return BandwidthResult(nbytes, threads, passes, max(rates), statistics.median(rates))
