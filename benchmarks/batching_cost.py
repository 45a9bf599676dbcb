"""CPU seconds of the prune pass (Wanda / SparseGPT, uniform 70 %) with batched vs per-sample block calls,
against one dense forward over the same calibration set.

    python benchmarks/batching_cost.py minilm wanda,sparsegpt > benchmarks/results/batching_cost_minilm.jsonl

Per-sample mode sets the block runner's batch limit to 1 token (compiler/block_batching.py). CPU time
(process_time, both threads) rather than wall time, because the machine may be shared.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import compiler.block_runner as br
from compiler.calibration import CalibrationConfig, build_calibration
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline
from compiler.registry import Registry
from compiler.trace import call_model, load_and_trace


def main() -> None:
    torch.set_num_threads(2)
    model, methods = sys.argv[1], sys.argv[2].split(",")
    ir = load_and_trace(model)
    calib = build_calibration(ir, CalibrationConfig(samples=32, seqlen=128))
    t = time.process_time()
    with torch.no_grad():
        call_model(ir.module, {k: torch.cat([s[k] for s in calib.samples]) for k in calib.samples[0]})
    dense_cpu = time.process_time() - t
    print(json.dumps({"model": model, "dense_forward_cpu_s": round(dense_cpu, 2), "load_average": os.getloadavg()}), flush=True)
    for method in methods:
        for mode in ("batched", "per-sample"):
            br.DEFAULT_MAX_TOKENS = 4096 if mode == "batched" else 1
            x = ir.clone()
            t, w = time.process_time(), time.perf_counter()
            spec = f"sparsity-allocation{{method=uniform,target=0.7}},prune{{method={method}}}"
            Pipeline.from_spec(spec, Registry.default()).run(x, PassContext(calibration=calib))
            cpu = time.process_time() - t
            print(json.dumps({"model": model, "method": method, "mode": mode, "cpu_s": round(cpu, 2),
                              "wall_s": round(time.perf_counter() - w, 2), "x_dense_forward": round(cpu / dense_cpu, 2),
                              "load_average": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
