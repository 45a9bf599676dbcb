"""Batch-1 greedy decode of a whole model on the torch host: sparsec kernels vs torch dense (issue 12).

    python benchmarks/kernels_decode.py                      # SmolLM2-135M (built in), 70 % magnitude + int8
    python benchmarks/kernels_decode.py --model DIR --sparsity 0.7 --tokens 64
    python benchmarks/kernels_decode.py --configs "torch fp32;sparsec int4;sparsec dense int4"

Every Linear inside the decoder blocks is pruned by magnitude to --sparsity (per layer; tokens/s does not
depend on which weights are zero), written as an artifact (model/ + manifest plan) and packed with int8
or int4 values; the LM head takes the dense int8 kernel. Timed INTERLEAVED, same prompt, same number of
new tokens, transformers' generate with its KV cache in every case (--configs picks among):
  torch fp32      the pruned HF model as is (dense fp32 matmuls; MKL)
  sparsec int8    packed sparse int8 blocks + dense int8 LM head (our kernels; q/k/v and gate/up fused)
  sparsec int8, unfused     the same weights, one op per Linear (the fusion A/B)
  sparsec dense int8   every block Linear on our dense int8 kernel (the same-family dense baseline)
  sparsec int4    packed sparse int4 blocks (group-64 scales) + dense int8 LM head
  sparsec dense int4   every block Linear on our dense int4 kernel
  sparsec int8, fp32 head   sparse int8 blocks, LM head left to torch fp32 (what the head costs)
Reports tokens/s (median over --runs), the weight bytes each reads per token, and whether the greedy
tokens match torch fp32. Records `uptime` and the CPU. Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

# OpenMP's default ~300k-iteration spin after each parallel region steals the shared cores the next
# op needs (compiler/__init__.py sets the same); libgomp reads it when torch loads, so set it first.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from repo_paths import RESULTS, ROOT, repo_relative  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="HF directory or a built-in name (smollm2)")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=";".join(CONFIGS), help="configurations to time, separated by ';'")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-kernels-decode")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels_decode.json")
    return ap.parse_args(argv)


# label -> (plan quantization, min_sparsity for the sparse kinds, LM head, fuse q/k/v + gate/up)
PACKS = {"sparsec int8": ("int8", 0.25, "dense-int8", True),
         "sparsec int8, unfused": ("int8", 0.25, "dense-int8", False),
         "sparsec dense int8": ("int8", 1.01, "dense-int8", True),
         "sparsec int4": ("int4", 0.25, "dense-int8", True),
         "sparsec dense int4": ("int4", 1.01, "dense-int8", True),
         "sparsec int8, fp32 head": ("int8", 0.25, "none", True)}
CONFIGS = ("torch fp32", "sparsec int8", "sparsec int8, unfused", "sparsec dense int8", "sparsec int4",
           "sparsec dense int4")


def build_artifacts(model_dir: Path, sparsity: float, cache: Path, labels: list[str]) -> dict[str, Path]:
    """The pruned artifact, packed once per configuration in `labels` (see PACKS)."""
    import torch

    from runtimes.kernels.pack import linear_weight, load_artifact_model, pack_artifact

    root = cache / f"{model_dir.name}-s{int(sparsity * 100)}"
    if not (root / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        model = load_artifact_model(model_dir)
        plan = {}
        blocks = model.get_decoder().layers
        for name, mod in model.named_modules():
            inside = any(name.startswith(f"model.layers.{i}.") for i in range(len(blocks)))
            if inside and isinstance(mod, torch.nn.Linear):
                w, _ = linear_weight(mod)
                k = max(1, int(sparsity * w.numel()))
                threshold = w.abs().flatten().kthvalue(k).values
                with torch.no_grad():
                    mod.weight[mod.weight.abs() <= threshold] = 0.0
                plan[name] = {"block": 0, "quant": "int8", "target_sparsity": sparsity}
        shutil.copytree(model_dir, root / "model")
        model.save_pretrained(root / "model")
        (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "plan": plan}))
    base_plan = json.loads((root / "manifest.json").read_text())["plan"]
    out = {}
    for label in labels:
        if label not in PACKS:
            continue
        quant, min_sparsity, head, _ = PACKS[label]
        d = root / ("pack-" + label.replace(" ", "_").replace(",", "").replace("_unfused", ""))
        if not (d / "weights.safetensors").is_file():
            plan = {n: {**e, "quant": quant} for n, e in base_plan.items()}
            pack_artifact(root, d, min_sparsity=min_sparsity, lm_head=head, plan=plan)
        out[label] = d / "weights.safetensors"
    return {"root": root, **out}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    if not 0 < args.sparsity < 1 or args.tokens <= 0 or args.runs <= 0:
        print("error: --sparsity in (0, 1), --tokens and --runs > 0", file=sys.stderr)
        return 2
    labels = [c.strip() for c in args.configs.split(";") if c.strip()]
    unknown = [c for c in labels if c != "torch fp32" and c not in PACKS]
    if unknown or "torch fp32" not in labels:
        print(f"error: --configs must include 'torch fp32' and name known configurations (unknown: {unknown}; "
              f"known: torch fp32, {', '.join(PACKS)})", file=sys.stderr)
        return 2
    import torch

    from compiler.trace import resolve_model_path
    from runtimes.kernels import ops as kops
    from runtimes.kernels.pack import load_artifact_model
    from runtimes.kernels.torch_host import load_host_model
    from runtimes.measure.machine import record_machine

    model_dir = Path(resolve_model_path(args.model))
    if not (model_dir / "config.json").is_file():
        print(f"error: '{model_dir}' is not a Hugging Face model directory", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    machine = record_machine(args.threads)
    before = uptime()
    arts = build_artifacts(model_dir, args.sparsity, args.cache, labels)
    ref = load_artifact_model(arts["root"] / "model")
    runners = {"torch fp32": ref}
    hosts = {}
    for label in labels:
        if label in PACKS:
            hosts[label] = load_host_model(arts["root"], arts[label], fuse=PACKS[label][3])
            runners[label] = hosts[label].model
    prompt = torch.tensor([[1, 504, 3458, 282, 260, 1345, 28, 253, 1672, 314]])[:, : 10]
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, num_beams=1, pad_token_id=0)
    times: dict[str, list[float]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    with torch.inference_mode():
        for label, m in runners.items():  # warm-up
            tokens[label] = m.generate(prompt, **gen)[0].tolist()
        for r in range(args.runs):
            order = list(runners)[r % len(runners):] + list(runners)[: r % len(runners)]
            for label in order:
                t = time.perf_counter()
                runners[label].generate(prompt, **gen)
                times[label].append(time.perf_counter() - t)
    dense_bytes = sum(p.numel() * 4 for n, p in ref.named_parameters() if p.dim() == 2 and "embed" not in n)
    dense_bytes += ref.get_output_embeddings().weight.numel() * 4
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        host = hosts.get(label)
        rows.append({"config": label, "tokens_per_s": round(args.tokens / med, 2),
                     "spread_tokens_per_s": [round(args.tokens / max(ts), 2), round(args.tokens / min(ts), 2)],
                     "packed_weight_bytes": host.packed_bytes() if host else None,
                     "same_greedy_tokens_as_torch_fp32": tokens[label] == tokens["torch fp32"]})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_torch_fp32"] = round(r["tokens_per_s"] / base, 3)
        print(f"{r['config']:26} {r['tokens_per_s']:8.2f} tok/s  x{r['speedup_vs_torch_fp32']:.2f}  "
              f"packed {r['packed_weight_bytes']}  same tokens: {r['same_greedy_tokens_as_torch_fp32']}")
    result = {"command": "python benchmarks/kernels_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "sparsity": args.sparsity, "new_tokens": args.tokens, "runs": args.runs,
              "threads": args.threads, "isa": kops.isa(), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
              "uptime_before": before, "uptime_after": uptime(),
              "fp32_linear_bytes_per_token": dense_bytes, "rows": rows, "machine": machine.finish().to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
