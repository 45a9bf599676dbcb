"""What compiling costs: seconds per pass and peak memory, per pruning method and allocation.

    python benchmarks/compile_cost.py                                   # issue #3: llama-110m, 128 x 512 tokens
    python benchmarks/compile_cost.py --model minilm --samples 32 --seqlen 128
    python benchmarks/compile_cost.py --model .cache/tiny-lm --samples 16,64

`--model llama-110m` (the default) is a Llama-architecture model with 113M prunable parameters
(hidden 768, 12 layers, MLP 3072, random init, seeded), built once under .cache/bench-compile/.

Each configuration runs in its own subprocess, so the peak resident memory (ru_maxrss) is its own.
Two baselines are measured the same way: the dense model's footprint (load + trace, no pass), and
one dense forward pass over the whole calibration set (batches of 8, no grad) — the unit of the
time target. Targets (issue #3), evaluated for every pipeline:
  * time: Wanda+OWL pipeline seconds ≤ 4 × the dense forward pass;
  * memory: peak RSS ≤ model bytes + 3 × one block's calibration activations + 1 GiB, where one
    block's activations are samples × seqlen × hidden × 4 bytes (the fp32 hidden states entering a
    block for the whole calibration set).
Writes benchmarks/results/compile_cost.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import RESULTS, ROOT, repo_relative

DENSE_FORWARD = "@dense-forward"
OWL_WANDA = "outlier-analysis,sparsity-allocation{method=owl,target=0.5},prune{method=wanda}"
BUILTIN = {"llama-110m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                              intermediate_size=3072, max_position_embeddings=1024)}


def builtin_model(name: str) -> str:
    """Path of a built-in benchmark model, built (random init, seed 0) and cached on first use."""
    if name not in BUILTIN:
        return name
    target = ROOT / ".cache" / "bench-compile" / name
    if not (target / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from compiler.tiny_models import train_tokenizer

        tokenizer = train_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), architectures=["LlamaForCausalLM"], bos_token_id=0,
                             eos_token_id=1, pad_token_id=2, **BUILTIN[name])
        torch.manual_seed(0)
        tmp = target.with_name(target.name + ".tmp")
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    return str(target)


def dense_forward_seconds(ir, calib, batch: int = 8) -> float:
    """One dense forward pass of the whole model over the calibration set."""
    import torch

    samples = calib.samples
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            ir.module(**{k: torch.cat([s[k] for s in chunk]) for k in chunk[0]})
    return time.perf_counter() - start


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
    params = sum(p.numel() for p in ir.module.parameters())
    out = {"model": repo_relative(model) if Path(model).exists() else model, "spec": spec, "samples": samples, "seqlen": seqlen,
           "load_seconds": round(load_s, 2),
           "prunable_params": ir.prunable_params(), "model_bytes": sum(p.numel() * p.element_size() for p in ir.module.parameters()),
           "params": params}
    if spec:
        t0 = time.perf_counter()
        calib = build_calibration(ir, CalibrationConfig(samples=samples, seqlen=seqlen))
        out["calibration_seconds"] = round(time.perf_counter() - t0, 2)
        out["seqlen"] = calib.seqlen
        hidden = getattr(ir.config, "hidden_size", None) or getattr(ir.config, "n_embd", 0)
        out["block_activation_bytes"] = len(calib.samples) * calib.seqlen * hidden * 4
        if spec == DENSE_FORWARD:
            out["dense_forward_seconds"] = round(dense_forward_seconds(ir, calib), 2)
        else:
            run = Pipeline.from_spec(spec, Registry.default()).run(ir, PassContext(calibration=calib))
            out["passes"] = {r.name: round(r.seconds, 2) for r in run.records}
            out["pipeline_seconds"] = round(sum(r.seconds for r in run.records), 2)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-110m", help=f"built-in ({', '.join(BUILTIN)}), HF directory, minilm, ...")
    ap.add_argument("--specs", default=";".join([
        "sparsity-allocation{method=uniform,target=0.5},prune{method=magnitude}",
        "sparsity-allocation{method=uniform,target=0.5},prune{method=wanda}",
        OWL_WANDA,
        "sparsity-allocation{method=alphapruning,target=0.5},prune{method=wanda}",
        "sparsity-allocation{method=uniform,target=0.5},prune{method=sparsegpt}",
        "sparsity-allocation{method=uniform,target=0.5},nm-structure{n=2,m=4},prune{method=sparsegpt}",
    ]), help="';'-separated pipeline specs")
    ap.add_argument("--samples", default="128", help="comma-separated calibration sample counts")
    ap.add_argument("--seqlen", type=int, default=512)
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

    model = builtin_model(args.model)
    counts = [int(n) for n in args.samples.split(",")]
    jobs = [{"model": model, "spec": "", "samples": 0}]
    jobs += [{"model": model, "spec": DENSE_FORWARD, "samples": n} for n in counts]
    jobs += [{"model": model, "spec": s, "samples": n} for n in counts for s in args.specs.split(";") if s]
    rows = []
    for job in jobs:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job), "--seqlen", str(args.seqlen),
                               "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        Console().print(f"{job['spec'] or 'load + trace'} x {job['samples']}: {rows[-1]}")
    base = rows[0]["peak_rss_mib"]
    forward = {r["samples"]: r["dense_forward_seconds"] for r in rows if r["spec"] == DENSE_FORWARD}
    pipelines = [r for r in rows if r["spec"] not in ("", DENSE_FORWARD)]
    for r in pipelines:
        r["x_dense_forward"] = round(r["pipeline_seconds"] / forward[r["samples"]], 2)
        limit = r["model_bytes"] + 3 * r["block_activation_bytes"] + 2**30
        r["rss_limit_mib"] = round(limit / 2**20, 1)
        r["rss_target_met"] = r["peak_rss_mib"] <= r["rss_limit_mib"]
        if r["spec"] == OWL_WANDA:
            r["time_target_met"] = r["x_dense_forward"] <= 4.0
    title = (f"compile cost: {args.model} ({rows[0]['params']:,} params, {rows[0]['prunable_params']:,} prunable, "
             f"{args.threads} threads; dense forward over calibration: "
             + ", ".join(f"{n} x {args.seqlen}: {s:.1f}s" for n, s in forward.items()) + ")")
    table = Table(title=title)
    for col in ("pipeline", "samples x seqlen", "seconds", "x dense fwd", "per pass", "peak RSS MiB", "RSS limit MiB"):
        table.add_column(col)
    for r in pipelines:
        table.add_row(r["spec"], f"{r['samples']} x {r['seqlen']}", f"{r['pipeline_seconds']:.1f}", f"{r['x_dense_forward']:.2f}",
                      ", ".join(f"{k} {v:.1f}" for k, v in r["passes"].items()), f"{r['peak_rss_mib']:.0f}",
                      f"{r['rss_limit_mib']:.0f}{'' if r['rss_target_met'] else ' MISSED'}")
    Console().print(table)
    owl = [r for r in pipelines if r["spec"] == OWL_WANDA]
    targets = {"owl_wanda_x_dense_forward": [r["x_dense_forward"] for r in owl],
               "time_target_met": all(r["time_target_met"] for r in owl) if owl else None,
               "rss_target_met_all": all(r["rss_target_met"] for r in pipelines)}
    Console().print(f"targets: {targets}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "dense_peak_rss_mib": base,
                                    "dense_forward_seconds": forward, "targets": targets, "rows": pipelines}, indent=1))
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
