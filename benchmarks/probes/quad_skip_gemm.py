"""Build and run the quad-skip sparse int8 GEMM probe beside oneDNN's dense int8 GEMM (`torch._int_mm`), one thread.

    python benchmarks/probes/quad_skip_gemm.py [--shapes 768x768,3072x768,768x3072] [--sparsities 0.5,0.8,0.9]
        [--m 128] [--out benchmarks/results/probe_quad_skip_gemm.json]

The question (docs/kernels.md, "Encoders: could a sparse GEMM that skips work beat the GEMM library?"): at encoder
sizes the layers are compute-bound, so a sparse weight pays only if zero weights are skipped, not expanded. The
probe (quad_skip_gemm.cpp, g++ -O3 with AVX-512 VNNI/VBMI2 flags) computes only the 4-column quads holding a non-zero
weight; its results are checked exactly. Figures are dense-equivalent multiply-adds per second (N x K x M / time).
Needs g++ and a CPU with AVX-512 VNNI + VBMI2 (one-line error otherwise).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from repo_paths import RESULTS, repo_relative  # noqa: E402

FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vbmi2", "-mavx512vnni", "-mbmi2",
         "-mpopcnt"]


def onednn_gmacs(n: int, k: int, m: int, rounds: int = 15) -> float:
    import torch

    torch.set_num_threads(1)
    x = torch.randint(-127, 127, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    for _ in range(3):
        torch._int_mm(x, w.t())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        torch._int_mm(x, w.t())
        times.append(time.perf_counter() - t0)
    return m * n * k / sorted(times)[rounds // 2] / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="768x768,3072x768,768x3072")
    ap.add_argument("--sparsities", default="0.5,0.8,0.9")
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS / "probe_quad_skip_gemm.json")
    args = ap.parse_args(argv)
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").is_file() else ""
    if shutil.which("g++") is None or not all(f in flags for f in ("avx512_vnni", "avx512_vbmi2")):
        print("error: the probe needs g++ and a CPU with AVX-512 VNNI and VBMI2", file=sys.stderr)
        return 2
    from runtimes.measure.machine import record_machine

    machine = record_machine(threads=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "quad_skip_gemm"
        subprocess.run(["g++", *FLAGS, "-o", str(exe), str(HERE / "quad_skip_gemm.cpp")], check=True)
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            row = {"shape": shape, "m": args.m, "onednn_dense_gmacs": round(onednn_gmacs(n, k, args.m), 1)}
            for s in (float(v) for v in args.sparsities.split(",")):
                out = subprocess.run([str(exe), str(n), str(k), str(args.m), str(s), "-1"], capture_output=True, text=True,
                                     check=True).stdout
                if "MISMATCH" in out:
                    print(f"error: the probe's result differs from the reference: {out}", file=sys.stderr)
                    return 1
                row[f"quad_skip_{s:g}_gmacs"] = float(re.search(r"dense-equiv ([\d.]+) GMAC/s", out).group(1))
                row[f"nonzero_quads_{s:g}"] = float(re.search(r"nonzero quads ([\d.]+)", out).group(1))
            rows.append(row)
            print(json.dumps(row))
    args.out.write_text(json.dumps({"machine": machine.finish().to_dict(), "rows": rows,
                                    "command": "python benchmarks/probes/quad_skip_gemm.py " + " ".join(argv or sys.argv[1:])},
                                   indent=1) + "\n")
    print(f"machine: {machine.summary()}\nwrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
