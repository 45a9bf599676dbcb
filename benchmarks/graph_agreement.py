"""How far apart are two ways of running the same lowered weights? Logits agreement on held-out text.

    python benchmarks/graph_agreement.py --artifact ART --variant onnx/int8-dynamic/model.onnx

Compares, on the first `--tokens` held-out `eval` tokens of the artifact's tokenizer (one window, one
prefill, batch 1), the logits of:
- the portable graph run by onnxruntime at each graph-optimization level vs the same graph with
  optimizations disabled (how much onnxruntime's own rewrites move the numbers);
- the fused decode graph beside it (`decode_gqa.onnx`, compiler/lowering/gqa.py), when there is one, at
  both levels, vs the same reference.
Per pair: max |Δlogit| and next-token top-1 agreement. On an fp32 graph everything agrees to ~1e-4; a
W8A8 graph (`int8-dynamic`) of a model with outlier activations can disagree by whole logits — that is
the quantization's instability, not a graph's bug (docs/measurement.md). Writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from repo_paths import RESULTS, ROOT, repo_relative

sys.path.insert(0, str(ROOT))

LEVELS = ("DISABLE_ALL", "ENABLE_BASIC", "ENABLE_ALL")


def logits(path: Path, ids, lowering: dict, level: str):
    import numpy as np
    import onnxruntime as ort

    from compiler.lowering.feeds import lm_feeds

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_" + level)
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in lm_feeds(lowering, ids, np.ones_like(ids)).items() if k in names}
    return session.run(["logits"], feeds)[0][0]


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from decode_vs_genai import heldout_windows

    from compiler.lowering.files import GQA_FILE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--variant", default="onnx/model.onnx", help="the graph, relative to the artifact")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS / "graph_agreement.json")
    args = ap.parse_args(argv)
    lowering = json.loads((args.artifact / "manifest.json").read_text())["lowering"]
    ids = np.asarray([heldout_windows(args.artifact, args.tokens, args.tokens)[0]], dtype=np.int64)
    portable = args.artifact / args.variant
    reference = logits(portable, ids, lowering, "DISABLE_ALL")
    rows = []
    graphs = [("portable", portable)] + ([("fused", portable.parent / GQA_FILE)] if (portable.parent / GQA_FILE).is_file() else [])
    for name, path in graphs:
        for level in LEVELS:
            got = logits(path, ids, lowering, level)
            rows.append({"graph": name, "level": level, "max_abs_diff": float(np.abs(got - reference).max()),
                         "top1_agreement": float((got.argmax(-1) == reference.argmax(-1)).mean())})
            print(f"{name:9s} {level:12s} max|Δlogit| {rows[-1]['max_abs_diff']:10.3g}  top-1 agreement {rows[-1]['top1_agreement']:.3f}")
    result = {"artifact": str(args.artifact), "variant": args.variant, "tokens": int(ids.shape[1]),
              "reference": "portable graph, optimizations disabled", "rows": rows,
              "command": "python benchmarks/graph_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
