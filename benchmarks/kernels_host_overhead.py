"""Where a batch-1 decode step of the torch-hosted model spends its time: our ops vs everything else
(issue 12, host overhead), with and without the fused q/k/v and gate/up ops (runtimes/kernels/fuse.py), and on
the lean decoder host (runtimes/kernels/lean_decoder.py: the same packed weights, ~8 of our ops per block, its
in-place cache) — the A/B behind docs/kernels.md "The lean decoder host".

    python benchmarks/kernels_host_overhead.py                 # SmolLM2-135M, 70 % magnitude, int8, 1 thread

Builds (or reuses) benchmarks/kernels_decode.py's pruned artifact and its sparse-int8 pack, loads it
fused and unfused, and times single decode steps (one token, 10-token prompt; transformers' DynamicCache, or
the lean host's cache for "lean") INTERLEAVED: --rounds rounds of --steps steps each, per configuration — wall time and the
process's CPU time (on cores shared with other work the wall time includes time descheduled; the CPU
time is the work the step did). Then one profiled pass
per configuration (torch.profiler, self CPU time per op name): the sparsec:: ops' share of the step,
the rest (HF's attention, norms, rotary, cache concatenation, dispatcher) and the number of op calls.
Records `uptime` and the CPU. Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from kernels_decode import build_artifacts, uptime  # noqa: E402
from repo_paths import RESULTS, ROOT, repo_relative  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-kernels-decode")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels_host_overhead.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    if args.steps <= 0 or args.rounds <= 0 or not 0 < args.sparsity < 1:
        print("error: --steps and --rounds > 0, --sparsity in (0, 1)", file=sys.stderr)
        return 2
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from compiler.cache_api import cache_kwargs
    from compiler.trace import resolve_model_path
    from runtimes.kernels.lean_decoder import LeanCache, lean_host
    from runtimes.kernels.torch_host import load_host_model
    from runtimes.measure.machine import record_machine

    torch.set_num_threads(args.threads)
    machine = record_machine(args.threads)
    before = uptime()
    arts = build_artifacts(Path(resolve_model_path(args.model)), args.sparsity, args.cache, ["sparsec int8"])
    hosts = {"fused": load_host_model(arts["root"], arts["sparsec int8"], fuse=True),
             "unfused": load_host_model(arts["root"], arts["sparsec int8"], fuse=False)}
    prompt = torch.tensor([[1, 504, 3458, 282, 260, 1345, 28, 253, 1672, 314]])
    lean, why = lean_host(hosts["fused"])
    if lean is None:
        print(f"error: the lean host cannot run this model ({why})", file=sys.stderr)
        return 2

    def lean_steps(n: int) -> tuple[float, list[int], float]:
        cache = LeanCache(lean, [prompt[0].numpy()], prompt.shape[1] + n)
        tok = int(cache.prefill()[0].argmax())
        toks = []
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            tok = int(cache.step([0], [tok])[0].argmax())
            toks.append(tok)
        return (time.perf_counter() - start) / n, toks, (time.process_time() - cpu) / n

    def steps(model, n: int) -> tuple[float, list[int], float]:
        if model is None:
            return lean_steps(n)
        cache = DynamicCache()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = []
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(tok))
        return (time.perf_counter() - start) / n, toks, (time.process_time() - cpu) / n

    models = {"fused": hosts["fused"].model, "unfused": hosts["unfused"].model, "lean": None}
    times: dict[str, list[float]] = {k: [] for k in models}
    cpus: dict[str, list[float]] = {k: [] for k in models}
    tokens = {}
    rows = []
    with torch.inference_mode():
        for label, m in models.items():
            tokens[label] = steps(m, args.steps)[1]
        for r in range(args.rounds):
            order = list(models)[r % len(models):] + list(models)[:r % len(models)]
            for label in order:
                wall, _, cpu = steps(models[label], args.steps)
                times[label].append(wall)
                cpus[label].append(cpu)
        for label, m in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                per_step, _, _ = steps(m, args.steps)
            ka = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in ka) / args.steps / 1e3
            ours = sum(e.self_cpu_time_total for e in ka if e.key.startswith("sparsec::")) / args.steps / 1e3
            our_calls = sum(e.count for e in ka if e.key.startswith("sparsec::")) / args.steps
            all_calls = sum(e.count for e in ka) / args.steps
            top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]
            rows.append({"config": label, "step_ms_median": round(statistics.median(times[label]) * 1e3, 2),
                         "step_ms_min": round(min(times[label]) * 1e3, 2),
                         "step_cpu_ms_median": round(statistics.median(cpus[label]) * 1e3, 2),
                         "step_cpu_ms_min": round(min(cpus[label]) * 1e3, 2),
                         "profiled_step_ms": round(per_step * 1e3, 2), "profiled_self_cpu_ms": round(total, 2),
                         "sparsec_ops_self_ms": round(ours, 2), "sparsec_op_calls": our_calls,
                         "op_calls_per_step": all_calls,
                         "top_ops": [{"op": e.key, "calls": e.count / args.steps,
                                      "self_ms": round(e.self_cpu_time_total / args.steps / 1e3, 3)} for e in top]})
            print(f"{label:8} step median {rows[-1]['step_ms_median']:.2f} ms (min {rows[-1]['step_ms_min']:.2f}), CPU "
                  f"{rows[-1]['step_cpu_ms_median']:.2f} ms (min {rows[-1]['step_cpu_ms_min']:.2f}); "
                  f"profiled: self CPU {total:.2f} ms/step, sparsec ops {ours:.2f} ms in {our_calls:.0f} calls, "
                  f"{all_calls:.0f} op calls in all", flush=True)
    result = {"command": "python benchmarks/kernels_host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "sparsity": args.sparsity, "threads": args.threads, "steps": args.steps,
              "rounds": args.rounds, "uptime_before": before, "uptime_after": uptime(),
              "same_tokens_fused_unfused": tokens["fused"] == tokens["unfused"],
              # int8 activations: the lean host's summation order in norms/attention can flip a rounding and diverge later
              "same_tokens_lean_fused": tokens["lean"] == tokens["fused"], "rows": rows,
              "machine": machine.finish().to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
