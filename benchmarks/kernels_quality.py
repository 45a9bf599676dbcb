"""Held-out perplexity of the packed int8 / int4 variants of a causal LM, run through our kernels (issue 12,
the matched-quality comparison).

    python benchmarks/kernels_quality.py                       # SmolLM2-135M (built in), dense and 50 %
    python benchmarks/kernels_quality.py --sparsities 0,0.5 --max-tokens 2048

For each sparsity (magnitude per layer, every block Linear; 0 = the dense model) the model is packed
with int8 and with int4 values (`runtimes/kernels/format.py`; LM head dense int8) and evaluated by
`compiler.evaluate.perplexity` — the function `sparsec eval` uses, on the same held-out corpus
(`--data eval`, stdlib modules not used for calibration) — through the torch host, i.e. with the
kernels' per-token int8 activations. Beside them, the same pruned weights in fp32 (torch) and
fake-quantized with the dense int4 reference scheme onnxruntime's MatMulNBits / NNCF use here
(asymmetric, round-to-nearest, groups of 64 along the input dim, fp32 activations; compiler/lowering/int4.py).
Writes --out (JSON) with `uptime` and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from repo_paths import RESULTS, ROOT, repo_relative  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsities", default="0,0.5")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-kernels-quality")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels_quality.json")
    return ap.parse_args(argv)


def asym_int4_g64(w, group: int = 64):
    """Dense asymmetric RTN int4 in groups of 64 along the input dim (MatMulNBits' scheme: the range
    [min(w, 0), max(w, 0)] in 15 steps, an integer zero point), dequantized to fp32."""
    import torch

    n, k = w.shape
    kp = -(-k // group) * group
    pad = torch.zeros(n, kp)
    pad[:, :k] = w
    g = pad.view(n, kp // group, group)
    lo, hi = g.amin(2).clamp(max=0), g.amax(2).clamp(min=0)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(-lo / safe).clamp(0, 15)
    q = torch.round(g / safe[..., None] + zp[..., None]).clamp(0, 15)
    return ((q - zp[..., None]) * scale[..., None]).view(n, kp)[:, :k]


def pruned_artifact(model_dir: Path, sparsity: float, cache: Path) -> Path:
    import torch

    from runtimes.kernels.pack import load_artifact_model

    root = cache / f"{model_dir.name}-s{int(round(sparsity * 100))}"
    if (root / "manifest.json").is_file():
        return root
    model = load_artifact_model(model_dir)
    plan = {}
    for name, mod in model.named_modules():
        if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
            if sparsity > 0:
                w = mod.weight.detach()
                threshold = w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
                with torch.no_grad():
                    mod.weight[mod.weight.abs() <= threshold] = 0.0
            plan[name] = {"block": 0, "quant": "int8", "target_sparsity": sparsity}
    root.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copytree(model_dir, root / "model", dirs_exist_ok=True)
    model.save_pretrained(root / "model")
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "plan": plan}))
    return root


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        print(f"error: --sparsities must be comma-separated numbers, got '{args.sparsities}'", file=sys.stderr)
        return 2
    if any(not 0 <= s < 1 for s in sparsities) or args.max_tokens < 2:
        print("error: sparsities in [0, 1) and --max-tokens >= 2", file=sys.stderr)
        return 2
    import torch

    from compiler.calibration import load_texts
    from compiler.evaluate import corpus_ids, perplexity
    from compiler.trace import resolve_model_path
    from runtimes.kernels.pack import load_artifact_model, pack_artifact
    from runtimes.kernels.torch_host import load_host_model
    from runtimes.measure.machine import record_machine

    torch.set_num_threads(args.threads)
    model_dir = Path(resolve_model_path(args.model))
    machine = record_machine(args.threads)
    before = uptime()
    from transformers import AutoTokenizer

    ids = corpus_ids(AutoTokenizer.from_pretrained(str(model_dir)), load_texts("eval"), args.max_tokens)
    rows = []

    def record(label: str, sparsity: float, module, seconds_from: float) -> None:
        ppl = perplexity(module, ids, args.seqlen, args.stride)
        rows.append({"config": label, "sparsity": sparsity, "perplexity": round(ppl.value, 3), "tokens": ppl.tokens,
                     "seconds": round(time.perf_counter() - seconds_from, 1)})
        print(f"{label:34} s={sparsity:.2f} ppl {ppl.value:9.3f}  ({ppl.tokens} tokens)", flush=True)

    for s in sparsities:
        root = pruned_artifact(model_dir, s, args.cache)
        t = time.perf_counter()
        ref = load_artifact_model(root / "model")
        record("torch fp32", s, ref, t)
        t = time.perf_counter()
        with torch.no_grad():
            for name, mod in ref.named_modules():
                if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(asym_int4_g64(mod.weight.detach()))
        record("int4 asym g64 RTN (fp32 activations)", s, ref, t)
        del ref
        plan = json.loads((root / "manifest.json").read_text())["plan"]
        for quant in ("int8", "int4"):
            t = time.perf_counter()
            d = root / f"pack-{quant}"
            if not (d / "weights.safetensors").is_file():
                pack_artifact(root, d, min_sparsity=0.25, plan={n: {**e, "quant": quant} for n, e in plan.items()})
            host = load_host_model(root, d / "weights.safetensors")
            kinds = sorted({m.kind for m in host.packed.values()})
            record(f"sparsec {quant} ({'+'.join(kinds)})", s, host.model, t)
    result = {"command": "python benchmarks/kernels_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "data": "eval (stdlib held-out modules)", "seqlen": args.seqlen,
              "stride": args.stride, "max_tokens": args.max_tokens, "threads": args.threads,
              "uptime_before": before, "uptime_after": uptime(), "rows": rows, "machine": machine.finish().to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
