"""Memory of the sparsec backend: resident weight bytes and bytes on disk vs the packed size (issue 12).

    python benchmarks/kernels_memory.py ART [ART ...] --out benchmarks/results/kernels_memory.json

For each artifact, in a fresh process: resident set size (RSS, /proc via psutil) after importing torch and
loading the kernel library and importing what a load imports (transformers, the model's class, its
tokenizer), then after `load_host_model` (packed layers + every other parameter, q/k/v and
gate/up fused), after a garbage collection. The weights the host must hold are the packed arrays (the
biases included) plus the parameters and buffers that are not packed (embeddings, norms); the issue's target
is resident weight bytes within 10 % of that, and the packed file on disk within 10 % of the packed arrays.
The artifact's `model/` keeps the dense source model beside the packed file (what `sparsec lower` re-lowers
other backends from); its size is reported separately. Peak RSS during loading is reported too (the
fused concatenation copies each group once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from repo_paths import RESULTS, repo_relative


def measure(artifact: Path) -> dict:
    import gc
    import resource

    import psutil
    import torch

    from runtimes.kernels.ops import load
    from runtimes.kernels.torch_host import load_host_model

    load()
    # the code a load imports (transformers, the model's class, the tokenizer) is not weights: import it first
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    from runtimes.kernels.pack import model_class

    model_class(AutoConfig.from_pretrained(str(artifact / "model")))
    AutoTokenizer.from_pretrained(str(artifact / "model"))
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    host = load_host_model(artifact, threads=1)
    gc.collect()
    after = proc.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    packed = host.packed_bytes()
    kernel_params = {id(b) for k in host.kernels() for b in k.buffers() if b is not None}
    seen: set[int] = set()
    other = 0
    for t in [*host.model.parameters(), *host.model.buffers()]:
        if id(t) in kernel_params or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        other += t.numel() * t.element_size()
    weights_file = artifact / "sparsec" / "weights.safetensors"
    model_dir = artifact / "model"
    model_bytes = sum(p.stat().st_size for p in model_dir.resolve().glob("*.safetensors"))
    fmt = json.loads((artifact / "sparsec" / "format.json").read_text())
    del host
    return {"artifact": str(artifact), "packed_bytes": packed, "other_weight_bytes": other,
            "expected_resident_bytes": packed + other, "rss_before": before, "rss_after_load": after,
            "resident_delta": after - before, "resident_over_expected": round((after - before) / (packed + other), 4),
            "peak_rss": peak, "packed_file_bytes": weights_file.stat().st_size,
            "packed_arrays_in_format_json": fmt["packed_bytes"],
            "file_over_packed": round(weights_file.stat().st_size / fmt["packed_bytes"], 4),
            "model_dir_bytes": model_bytes, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "kernels_memory.json")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    missing = [a for a in args.artifacts if not (a / "sparsec" / "weights.safetensors").is_file()]
    if missing:
        print(f"error: '{missing[0]}' has no packed sparsec/weights.safetensors (compile with --backend sparsec)",
              file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(measure(args.artifacts[0])))
        return 0
    rows = []
    for art in args.artifacts:  # each in its own process: RSS is not shared with the previous artifact
        out = subprocess.run([sys.executable, __file__, str(art), "--one"], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{art}: packed {row['packed_bytes'] / 2**20:.1f} MiB + other {row['other_weight_bytes'] / 2**20:.1f} MiB; "
              f"resident +{row['resident_delta'] / 2**20:.1f} MiB ({row['resident_over_expected']:.3f}x); "
              f"file {row['file_over_packed']:.4f}x the packed arrays; peak RSS {row['peak_rss'] / 2**20:.0f} MiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python benchmarks/kernels_memory.py " + " ".join(map(str, args.artifacts)),
                                    "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
