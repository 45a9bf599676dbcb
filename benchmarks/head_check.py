"""The LM-head quantization check (passes/head_check.py) on a real model, per scheme: the figures README
quotes for SmolLM2 (whether the quantize pass's `include_outside_blocks=auto` puts the head in the plan).

    python benchmarks/head_check.py --model smollm2 --schemes int8-dynamic,int8,int4

Calibration as the compile's default shape here: `--samples` × `--seqlen` tokens of the built-in calibration
text; the check reads the first 512 next-token predictions (passes.head_check.MAX_TOKENS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from repo_paths import RESULTS, ROOT, repo_relative

sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--schemes", default="int8-dynamic,int8,int4")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "head_check_smollm2.json"))
    args = ap.parse_args(argv)
    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.trace import load_and_trace
    from passes.head_check import check_head
    from runtimes.measure.machine import record_machine

    machine = record_machine(threads=None)
    ir = load_and_trace(args.model)
    heads = [n for n, layer in ir.layers.items() if layer.block is None]
    samples = build_calibration(ir, CalibrationConfig(samples=args.samples, seqlen=args.seqlen)).samples
    rows = []
    for scheme in (s for s in args.schemes.split(",") if s):
        for head in heads:
            check = check_head(ir, head, samples, scheme)
            print(check.describe(), flush=True)
            rows.append(check.to_dict())
    with open(args.out, "w") as f:
        json.dump({"machine": machine.finish().to_dict(), "model": args.model, "rows": rows, "load": os.getloadavg()[0],
                   "command": "python benchmarks/head_check.py " + " ".join(argv or sys.argv[1:])}, f, indent=1)
        f.write("\n")
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
