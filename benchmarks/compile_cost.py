"""What compiling costs: seconds per pass and peak memory, per pruning method and allocation.

    python benchmarks/compile_cost.py                          # MiniLM, 32 x 128 calibration tokens
    python benchmarks/compile_cost.py --model .cache/tiny-lm --samples 16,64

Each configuration runs in its own subprocess, so the peak resident memory (ru_maxrss) is its own.
The dense model's footprint (load + trace, no pass) is measured the same way as the baseline: the
extra memory of a pipeline is the difference. Writes benchmarks/results/compile_cost.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model: str, spec: str, samples: int, seqlen: int, threads: int) -> dict:
    """Run one pipeline in this process; returns pass seconds and peak RSS (MiB)."""
    import torch

    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.pass_infra import PassContext
    from compiler.pipeline import Pipeline
    from compiler.registry import Registry
    from compiler.trace import load_and_trace

    torch.set_num_threads(threads)
    start = time.perf_counter()
    ir = load_and_trace(model)
    load_s = time.perf_counter() - start
    out = {"model": model, "spec": spec, "samples": samples, "seqlen": seqlen, "load_seconds": round(load_s, 2),
           "prunable_params": ir.prunable_params()}
    if spec:
        t0 = time.perf_counter()
        calib = build_calibration(ir, CalibrationConfig(samples=samples, seqlen=seqlen))
        out["calibration_seconds"] = round(time.perf_counter() - t0, 2)
        run = Pipeline.from_spec(spec, Registry.default()).run(ir, PassContext(calibration=calib))
        out["passes"] = {r.name: round(r.seconds, 2) for r in run.records}
        out["pipeline_seconds"] = round(sum(r.seconds for r in run.records), 2)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--specs", default=";".join([
        "sparsity-allocation{method=uniform,target=0.5},prune{method=magnitude}",
        "sparsity-allocation{method=uniform,target=0.5},prune{method=wanda}",
        "outlier-analysis,sparsity-allocation{method=owl,target=0.5},prune{method=wanda}",
        "sparsity-allocation{method=alphapruning,target=0.5},prune{method=wanda}",
        "sparsity-allocation{method=uniform,target=0.5},prune{method=sparsegpt}",
        "sparsity-allocation{method=uniform,target=0.5},nm-structure{n=2,m=4},prune{method=sparsegpt}",
    ]), help="';'-separated pipeline specs")
    ap.add_argument("--samples", default="32", help="comma-separated calibration sample counts")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "compile_cost.json")
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(measure(job["model"], job["spec"], job["samples"], args.seqlen, args.threads)))
        return

    from rich.console import Console
    from rich.table import Table

    jobs = [{"model": args.model, "spec": "", "samples": 0}]
    jobs += [{"model": args.model, "spec": s, "samples": int(n)} for n in args.samples.split(",") for s in args.specs.split(";") if s]
    rows = []
    for job in jobs:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job), "--seqlen", str(args.seqlen),
                               "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mib"]
    table = Table(title=f"compile cost: {args.model} ({rows[0]['prunable_params']:,} prunable params, {args.threads} threads)")
    for col in ("pipeline", "samples x seqlen", "seconds (passes)", "per pass", "peak RSS MiB", "+ vs dense"):
        table.add_column(col)
    for r in rows[1:]:
        table.add_row(r["spec"], f"{r['samples']} x {r['seqlen']}", f"{r['pipeline_seconds']:.1f}",
                      ", ".join(f"{k} {v:.1f}" for k, v in r["passes"].items()), f"{r['peak_rss_mib']:.0f}",
                      f"{r['peak_rss_mib'] - base:+.0f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dense_peak_rss_mib": base, "rows": rows[1:]}, indent=1))
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
