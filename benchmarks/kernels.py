"""sparsec's own kernels: sparse GEMV vs our dense int8 GEMV and torch's dense fp32, bytes/s vs the probe (issue 12).

    python benchmarks/kernels.py                     # 3 Llama MLP shapes x both orientations x 0-90 % x int8/fp32
    python benchmarks/kernels.py --shapes 4096x11008 --rounds 10
    python benchmarks/kernels.py --dtypes int4 --shapes 576x1536,2048x5632,4096x11008 --sparsities 0,0.5,0.7,0.9
    python benchmarks/kernels.py --dtypes bf16 --gemm-shape "" --out benchmarks/results/kernels_bf16.json

Shapes are out x in as they occur in Llama MLPs (up/gate: hidden -> intermediate, down: back). Per
(shape, precision) every configuration runs INTERLEAVED at batch 1 with 2 threads: the dense baseline
(int8: our dense VNNI kernel of the same family; fp32: torch's F.linear, i.e. MKL) and the packed sparse
kernel at each sparsity. `bf16` groups take our dense bf16 kernel as the base and interleave torch's
dense fp32 and bf16 (oneDNN) GEMV and sparse bf16 at each sparsity. `int4` groups take our dense int4 kernel as the baseline and interleave it with
our dense int8 kernel, sparse int4 and sparse int8 at each sparsity (one group: the same DRAM, the same
moments of load). Each configuration rotates over enough copies of its weight that the set
(over all configurations of the group, > 2x the 300 MiB L3 here) is read from DRAM, as in decode where
every weight is read once per token. Reported: median and p10/p90 of wall time, bytes actually read
(packed non-zeros + masks + per-row arrays) / median time, that rate over the streaming-read probe
(runtimes/measure/membw.py, measured before and after) and speed-up vs the dense baseline. The cores
are shared with other work: the load average before and after is recorded with the results.
Also: per-op call overhead at batch 1 (a no-op torch op, a 64x64 layer) and small-M GEMM (M = 1..128).
Writes --out (JSON) and a Markdown table beside it; records `uptime`, the CPU model and the kernel ISA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

# OpenMP's default ~300k-iteration spin after each parallel region steals the shared cores the next
# op needs (compiler/__init__.py sets the same); libgomp reads it when torch loads, so set it first.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from repo_paths import RESULTS, repo_relative  # noqa: E402

SHAPES = "1536x576,576x1536,5632x2048,2048x5632,11008x4096,4096x11008"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="out x in, comma separated")
    ap.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9")
    ap.add_argument("--dtypes", default="int8,fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=25, help="interleaved rounds (one call of every configuration each)")
    ap.add_argument("--cold-mib", type=float, default=160.0, help="bytes of weight copies per configuration")
    ap.add_argument("--gemm-shape", default="11008x4096", help="shape of the small-M GEMM sweep ('' to skip)")
    ap.add_argument("--gemm-m", default="1,4,8,16,32,64,128")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    return ap.parse_args(argv)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class Config:
    """One timed configuration: a callable over rotating weight copies and the bytes one call reads."""

    def __init__(self, label: str, sparsity: float | None, calls: list, nbytes: int):
        self.label, self.sparsity, self.calls, self.nbytes = label, sparsity, calls, nbytes
        self.wall: list[float] = []
        self.i = 0

    def run_once(self) -> None:
        fn = self.calls[self.i % len(self.calls)]
        self.i += 1
        t0 = time.perf_counter()
        fn()
        self.wall.append(time.perf_counter() - t0)


def sparse_weight(n: int, k: int, sparsity: float, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if sparsity > 0:
        w[torch.rand(n, k, generator=g) < sparsity] = 0.0
    return w


def copies_of(packed, nbytes: int, cold_bytes: float) -> list:
    """The packed layer plus clones of its arrays, enough to spill the caches between two calls."""
    import copy

    count = max(1, min(256, int(cold_bytes // max(nbytes, 1)) + 1))
    out = [packed]
    for _ in range(count - 1):
        dup = copy.copy(packed)
        dup.tensors = {k: v.clone() for k, v in packed.tensors.items()}
        out.append(dup)
    return out


def call_for(ops, packed, x):
    from runtimes.kernels.modules import packed_call

    f = packed_call(packed.kind, packed.tensors, None, packed.out_features)
    return lambda: f(x)


def build_group(n: int, k: int, dtype: str, sparsities: list[float], cold_bytes: float, m: int = 1) -> list[Config]:
    import torch

    from runtimes.kernels.format import pack_linear
    from runtimes.kernels.ops import ops

    o = ops()
    x = torch.randn(m, k)
    configs = []
    base = sparse_weight(n, k, 0.0, seed=n + k)
    if dtype == "int4":
        for kind, label in (("dense-int4", "dense int4 (ours)"), ("dense-int8", "dense int8 (ours)")):
            dense = pack_linear(base, kind)
            nbytes = dense.bytes_read()
            configs.append(Config(label, None, [call_for(o, c, x) for c in copies_of(dense, nbytes, cold_bytes)], nbytes))
        for s in sparsities:
            w = sparse_weight(n, k, s, seed=int(s * 100) + n)
            for kind in ("sparse-int4", "sparse-int8"):
                packed = pack_linear(w, kind)
                nbytes = packed.bytes_read()
                configs.append(Config(f"{kind.replace('-', ' ')} {int(round(s * 100))}%", s,
                                      [call_for(o, c, x) for c in copies_of(packed, nbytes, cold_bytes)], nbytes))
        return configs
    if dtype == "bf16":  # our dense bf16 first (the speedup base), then torch's fp32 and bf16 (oneDNN) GEMV
        dense = pack_linear(base, "dense-bf16")
        nbytes = dense.bytes_read()
        configs.append(Config("dense bf16 (ours)", None, [call_for(o, c, x) for c in copies_of(dense, nbytes, cold_bytes)], nbytes))
        for label, dt, size in (("dense fp32 (torch)", torch.float32, 4), ("dense bf16 (torch)", torch.bfloat16, 2)):
            count = max(1, min(256, int(cold_bytes // (size * n * k)) + 1))
            xs = x.to(dt)
            weights = [base.to(dt) for _ in range(count)]
            configs.append(Config(label, None, [(lambda w=w, xs=xs: torch.nn.functional.linear(xs, w)) for w in weights],
                                  size * n * k))
    elif dtype == "int8":
        dense = pack_linear(base, "dense-int8")
        nbytes = dense.bytes_read()
        configs.append(Config("dense int8 (ours)", None, [call_for(o, c, x) for c in copies_of(dense, nbytes, cold_bytes)], nbytes))
    else:
        nbytes = 4 * n * k
        count = max(1, min(256, int(cold_bytes // nbytes) + 1))
        weights = [base] + [base.clone() for _ in range(count - 1)]
        configs.append(Config("dense fp32 (torch)", None,
                              [(lambda w=w: torch.nn.functional.linear(x, w)) for w in weights], nbytes))
    kind = f"sparse-{dtype}"
    for s in sparsities:
        packed = pack_linear(sparse_weight(n, k, s, seed=int(s * 100) + n), kind)
        nbytes = packed.bytes_read()
        configs.append(Config(f"sparse {dtype} {int(round(s * 100))}%", s,
                              [call_for(o, c, x) for c in copies_of(packed, nbytes, cold_bytes)], nbytes))
    return configs


def run_interleaved(configs: list[Config], rounds: int) -> None:
    for c in configs:  # warm-up: one pass over every copy (page faults, first-touch)
        for _ in range(min(len(c.calls), 8)):
            c.run_once()
        c.wall.clear()
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            c.run_once()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def summarise(configs: list[Config], probe_gbps: float) -> list[dict]:
    base = statistics.median(configs[0].wall)
    best = min(configs[0].wall)
    rows = []
    for c in configs:
        med = statistics.median(c.wall)
        rows.append({"config": c.label, "sparsity": c.sparsity, "bytes_read": c.nbytes,
                     "median_us": round(med * 1e6, 1), "min_us": round(min(c.wall) * 1e6, 1),
                     "gbps_at_min": round(c.nbytes / min(c.wall) / 1e9, 2),
                     "speedup_vs_dense_at_min": round(best / min(c.wall), 3), "p10_us": round(pct(c.wall, 0.1) * 1e6, 1),
                     "p90_us": round(pct(c.wall, 0.9) * 1e6, 1), "gbps": round(c.nbytes / med / 1e9, 2),
                     "of_probe": round(c.nbytes / med / 1e9 / probe_gbps, 3) if probe_gbps else None,
                     "speedup_vs_dense": round(base / med, 3), "copies": len(c.calls)})
    return rows


def overhead(threads: int) -> dict:
    """Per-call cost at batch 1: a no-op sparsec op, and a 64x64 layer on every path."""
    import torch

    from runtimes.kernels.format import pack_linear
    from runtimes.kernels.ops import ops

    o = ops()
    x = torch.randn(1, 64)
    w = sparse_weight(64, 64, 0.7, 1)
    cases = {"torch.ops.sparsec.noop": lambda: o.noop(x), "torch F.linear 64x64 fp32": lambda: torch.nn.functional.linear(x, w)}
    for kind in ("sparse-int8", "sparse-fp32", "dense-int8", "sparse-int4", "dense-int4", "sparse-bf16", "dense-bf16"):
        cases[f"sparsec {kind} 64x64"] = call_for(o, pack_linear(w, kind), x)
    out = {}
    for name, fn in cases.items():
        for _ in range(200):
            fn()
        best = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(2000):
                fn()
            best.append((time.perf_counter() - t) / 2000)
        out[name] = round(statistics.median(best) * 1e6, 2)
    return out


def gemm_sweep(shape: str, ms: list[int], rounds: int, cold_bytes: float) -> list[dict]:
    """Small-M GEMM: 70 % sparse vs dense at each M, int8 and fp32 (interleaved per M)."""
    n, k = (int(v) for v in shape.split("x"))
    rows = []
    for m in ms:
        for dtype in ("int8", "fp32"):
            configs = build_group(n, k, dtype, [0.7], cold_bytes / 2, m=m)
            run_interleaved(configs, max(5, rounds // 2))
            d, s = (statistics.median(c.wall) for c in configs)
            rows.append({"m": m, "dtype": dtype, "dense": configs[0].label, "dense_us": round(d * 1e6, 1),
                         "sparse70_us": round(s * 1e6, 1), "speedup": round(d / s, 3)})
            print(f"  GEMM {shape} M={m:<4} {dtype}: dense {d * 1e3:8.3f} ms  sparse 70% {s * 1e3:8.3f} ms  x{d / s:.2f}", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# sparsec kernels — {result['machine']['cpu_model']}, {result['threads']} threads, ISA {result['isa']}", "",
             f"Command: `{result['command']}`  ", f"uptime before: `{result['uptime_before']}`  ",
             f"uptime after: `{result['uptime_after']}`  ", f"GOMP_SPINCOUNT={result.get('gomp_spincount')}  ",
             f"Streaming-read probe (runtimes/measure/membw.py, 2 threads): {result['probe_gbps_before']} GB/s before, "
             f"{result['probe_gbps_after']} GB/s after (best of 7 passes over 512 MiB).", "",
             "Median of the interleaved rounds, and the fastest round (`min`: the least disturbed one when",
             "other work shares the cores; its speed-up is min vs min).", "",
             "| shape (out x in) | dtype | config | median µs | p10–p90 µs | MB read | GB/s | of probe | vs dense "
             "| min µs | GB/s at min | vs dense at min |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for g in result["groups"]:
        for r in g["rows"]:
            lines.append(f"| {g['shape']} | {g['dtype']} | {r['config']} | {r['median_us']} | {r['p10_us']}–{r['p90_us']} | "
                         f"{r['bytes_read'] / 1e6:.2f} | {r['gbps']} | {r['of_probe']} | {r['speedup_vs_dense']}x | "
                         f"{r['min_us']} | {r['gbps_at_min']} | {r['speedup_vs_dense_at_min']}x |")
    lines += ["", "Per-call overhead at batch 1 (µs, median of 7 x 2000 calls):", ""]
    lines += [f"- {k}: {v}" for k, v in result["overhead_us"].items()]
    if result.get("gemm"):
        lines += ["", f"Small-M GEMM ({result['gemm_shape']}, 70 % sparse vs dense, µs):", "",
                  "| M | dtype | dense | dense µs | sparse 70% µs | speed-up |", "|---:|---|---|---:|---:|---:|"]
        lines += [f"| {r['m']} | {r['dtype']} | {r['dense']} | {r['dense_us']} | {r['sparse70_us']} | {r['speedup']}x |"
                  for r in result["gemm"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    import torch

    from runtimes.kernels import ops as kops
    from runtimes.measure.machine import record_machine
    from runtimes.measure.membw import measure_read_bandwidth

    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
        sparsities = [float(s) for s in args.sparsities.split(",") if s]
        dtypes = [d for d in args.dtypes.split(",") if d]
        gemm_ms = [int(v) for v in args.gemm_m.split(",") if v]
    except ValueError as exc:
        print(f"error: bad --shapes/--sparsities/--gemm-m: {exc}", file=sys.stderr)
        return 2
    if any(d not in ("int8", "fp32", "int4", "bf16") for d in dtypes) or any(not 0 <= s < 1 for s in sparsities):
        print("error: --dtypes takes int8,fp32,int4,bf16 and --sparsities values in [0, 1)", file=sys.stderr)
        return 2
    kops.load()
    torch.set_num_threads(args.threads)
    machine = record_machine(args.threads)
    result = {"command": "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "threads": args.threads, "isa": kops.isa(), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
              "uptime_before": uptime(), "machine": None, "groups": []}
    probe_before = measure_read_bandwidth(512, threads=args.threads).best_gbps
    result["probe_gbps_before"] = round(probe_before, 2)
    print(f"{result['uptime_before']}\nprobe {probe_before:.1f} GB/s, ISA {result['isa']}", flush=True)
    cold = args.cold_mib * (1 << 20)
    for n, k in shapes:
        for dtype in dtypes:
            configs = build_group(n, k, dtype, sparsities, cold)
            run_interleaved(configs, args.rounds)
            rows = summarise(configs, probe_before)
            result["groups"].append({"shape": f"{n}x{k}", "dtype": dtype, "rows": rows})
            for r in rows:
                print(f"{n}x{k} {dtype:4} {r['config']:20} {r['median_us']:9.1f} us  {r['gbps']:6.2f} GB/s "
                      f"({r['of_probe']} of probe)  x{r['speedup_vs_dense']:.2f}  p10-p90 {r['p10_us']}-{r['p90_us']}  "
                      f"min {r['min_us']} us x{r['speedup_vs_dense_at_min']:.2f}", flush=True)
            del configs
    result["overhead_us"] = overhead(args.threads)
    print("overhead (us):", result["overhead_us"], flush=True)
    if args.gemm_shape:
        result["gemm_shape"] = args.gemm_shape
        result["gemm"] = gemm_sweep(args.gemm_shape, gemm_ms, args.rounds, cold)
    result["probe_gbps_after"] = round(measure_read_bandwidth(512, threads=args.threads).best_gbps, 2)
    result["uptime_after"] = uptime()
    result["machine"] = machine.finish().to_dict()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = args.out.with_suffix(".md")
    md.write_text(markdown(result), encoding="utf-8")
    print(f"wrote {repo_relative(args.out)} and {repo_relative(md)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
