"""Re-pack a compiled artifact's pruned model under another plan quantization, without compiling again.

    python benchmarks/repack.py ART OUT --quant bf16      # e.g. bf16 twins of int8 artifacts (docs/kernels.md)
    python benchmarks/repack.py ART OUT --quant int8-dynamic --all-layers   # the outlier-excluded layers int8 too

Pruning does not depend on the quantization scheme (the quantize pass only decides), so the twin of
`sparsec compile MODEL --sparsity S --quantize Q --backend sparsec` for another scheme is the same `model/`
(symlinked, not copied) with every planned layer's `quant` replaced, packed by `pack_artifact`. Writes
OUT/manifest.json, OUT/model (a link) and OUT/sparsec/; `sparsec:auto@OUT` then runs it in
`benchmarks/decode_vs_genai.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

QUANTS = ("int8-dynamic", "int8-weight", "int4", "bf16", "none")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant", required=True, choices=QUANTS)
    ap.add_argument("--all-layers", action="store_true",
                    help="also quantize the planned layers the quantize pass left in fp32 (its activation-outlier "
                         "rule, max_activation_ratio): every planned layer takes --quant")
    args = ap.parse_args(argv)
    src, out = args.artifact, args.out
    if not (src / "manifest.json").is_file() or not (src / "model" / "config.json").is_file():
        print(f"error: '{src}' is not a compiled artifact with a model/ directory", file=sys.stderr)
        return 2
    from runtimes.kernels.pack import pack_artifact

    manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    for entry in manifest.get("plan", {}).values():
        if entry.get("quant") or (args.all_layers and entry is not None):
            entry["quant"] = None if args.quant == "none" else args.quant
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model").exists():
        os.symlink(os.path.relpath((src / "model").resolve(), out.resolve()), out / "model")
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result = pack_artifact(out)
    kinds: dict[str, int] = {}
    for layer in result.layers.values():
        kinds[layer["kind"]] = kinds.get(layer["kind"], 0) + 1
    print(f"{out}: {kinds}, {result.packed_bytes / 1e6:.1f} MB packed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
