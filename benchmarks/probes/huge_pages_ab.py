"""A/B: the sparsec host's packed arrays on 2 MiB transparent huge pages vs ordinary 4 KiB pages (decode, paired).

    python benchmarks/probes/huge_pages_ab.py ART [--threads 2] [--rounds 10] [--tokens 32]

Loads ART's packed host twice in one process; the second copy's arrays (every buffer >= 2 MiB) are moved to an
anonymous mapping advised MADV_HUGEPAGE (THP is `madvise` on the machines here), then alternates decode rounds of
the two hosts on the lean decoder (a 128-token prompt, then TOKENS single steps) and prints tokens/s of each and
the paired per-round ratio. docs/kernels.md records the result (no gain beyond the noise) and why it was dropped.
"""

from __future__ import annotations

import argparse
import mmap
import sys
import time
from pathlib import Path

HUGE = 2 << 20


def to_huge_pages(t) -> int:
    """Move tensor `t` (in place, via set_) onto a MADV_HUGEPAGE mapping; returns the bytes moved."""
    import torch

    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE:
        return 0
    m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    off = (-buf.data_ptr()) % HUGE
    new = buf[off:off + nbytes].view(t.dtype).view(t.shape)
    with torch.no_grad():
        new.copy_(t)
        t.set_(new)
    return nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        print("error: this OS has no MADV_HUGEPAGE", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from runtimes.kernels.host_runner import load_host
    from runtimes.kernels.lean_decoder import LeanCache, lean_host

    plain = load_host(args.artifact / "sparsec", args.threads)
    huge = load_host(args.artifact / "sparsec", args.threads)
    moved = sum(to_huge_pages(b) for k in huge.kernels() for b in k.buffers() if b is not None)
    torch.set_num_threads(args.threads)
    leans = [lean_host(plain)[0], lean_host(huge)[0]]
    if leans[0] is None:
        print("error: the artifact's model has no lean decoder host (a Llama-family causal LM is needed)", file=sys.stderr)
        return 2
    prompt = np.arange(100, 228, dtype=np.int64)

    def step_s(lean) -> float:
        cache = LeanCache(lean, [prompt], 128 + args.tokens + 8)
        cache.prefill()
        t0 = time.perf_counter()
        for i in range(args.tokens):
            cache.step([0], [100 + i])
        return (time.perf_counter() - t0) / args.tokens

    for lean in leans:
        step_s(lean)
    a, b = [], []
    for _ in range(args.rounds):
        a.append(step_s(leans[0]))
        b.append(step_s(leans[1]))
    ratio = np.asarray(a) / np.asarray(b)
    print(f"{args.threads} threads, {moved / 2**20:.0f} MiB on huge pages: 4 KiB pages {1 / np.median(a):.1f} tok/s, "
          f"huge pages {1 / np.median(b):.1f} tok/s, paired ratio median {np.median(ratio):.3f} "
          f"(range {ratio.min():.3f}-{ratio.max():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
