"""Sweep the sparse kernels' software prefetch distance (SPARSEC_PREFETCH_BYTES) on one cold GEMV.

    python benchmarks/kernels_prefetch.py                      # 11008x4096, 70 % int8, 1 thread
    python benchmarks/kernels_prefetch.py --distances 0,1024,3072 --threads 2

The distance is read once per process, so each value runs in its own subprocess; every process times
our dense int8 kernel on the same shape too (interleaved with the sparse one), rotating over weight
copies larger than the L3 so each call reads DRAM. Prints the fastest and median call per distance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(shape: str, sparsity: float, threads: int, rounds: int, cold_mib: float) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from kernels import build_group, run_interleaved

    torch.set_num_threads(threads)
    n, k = (int(v) for v in shape.split("x"))
    configs = build_group(n, k, "int8", [sparsity], cold_mib * (1 << 20))
    run_interleaved(configs, rounds)
    print(json.dumps({c.label: [min(c.wall), statistics.median(c.wall)] for c in configs}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distances", default="0,1024,2048,3072,4096")
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cold-mib", type=float, default=320.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.shape, args.sparsity, args.threads, args.rounds, args.cold_mib)
        return 0
    try:
        distances = [int(d) for d in args.distances.split(",") if d]
    except ValueError:
        print("error: --distances takes comma-separated byte counts", file=sys.stderr)
        return 2
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for d in distances:
        env = {**os.environ, "SPARSEC_PREFETCH_BYTES": str(d), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")}
        out = subprocess.run([sys.executable, __file__, "--child", "--shape", args.shape, "--sparsity", str(args.sparsity),
                              "--threads", str(args.threads), "--rounds", str(args.rounds), "--cold-mib", str(args.cold_mib)],
                             env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            print(f"error: distance {d}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}",
                  file=sys.stderr)
            return 1
        res = json.loads(out.stdout.strip().splitlines()[-1])
        cells = "  ".join(f"{label}: min {v[0] * 1e3:.3f} ms, median {v[1] * 1e3:.3f} ms" for label, v in res.items())
        print(f"prefetch {d:5d} B  {cells}", flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
