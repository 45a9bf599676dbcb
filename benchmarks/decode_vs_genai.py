"""sparsec's decode vs openvino-genai's own pipeline on the same model, in PAIRED rounds (issue 13's
"dense int8 decode within 1.2× of openvino-genai int8"): the two used to be run one after the other,
and on a shared machine identical runs minutes apart differed by 1.6×.

    python benchmarks/decode_vs_genai.py --artifact ART --configs openvino:onnx/int8-qdq/model.onnx \\
        --genai int8 --threads 1 --rounds 12 --out benchmarks/results/decode_vs_genai.json

Each round runs every configuration once, in a rotating order: each sparsec configuration (a lowered file
of ART on a backend, through the decoder `sparsec bench --decode` uses; `backend:path[:cache][@OTHER_ART]`) in this
process, and openvino-genai (`--genai`: the formats benchmarks/ovgenai_reference.py exports) in a child
process of its venv that keeps its pipeline loaded between rounds. Every run decodes `--tokens` tokens
greedily after the same `--prompt`-token prompt. The figure per run is decode ms per token (prefill
excluded: the per-step times for sparsec, the pipeline's TPOT for openvino-genai); the ratio per round
genai ms / sparsec ms (> 1: sparsec faster) gives a median with a bootstrap 95 % interval and a verdict
(runtimes/measure/speedup.py). The machine record (load before/after) is written with the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import RESULTS, ROOT, repo_relative

sys.path.insert(0, str(ROOT))


def genai_child(model_dir: str, prompt: int, tokens: int, threads: int) -> None:
    """Runs inside the openvino-genai venv: one generate per line read on stdin, a JSON line out."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    pipe = ov_genai.LLMPipeline(model_dir, "CPU", INFERENCE_NUM_THREADS=threads)
    ids = np.random.default_rng(0).integers(3, 8000, size=(1, prompt)).astype(np.int64)
    inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    config = ov_genai.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, ignore_eos=True, do_sample=False)
    pipe.generate(inputs, config)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        res = pipe.generate(inputs, config)
        wall = time.perf_counter() - start
        m = res.perf_metrics
        print(json.dumps({"tpot_ms": float(m.get_tpot().mean), "ttft_ms": float(m.get_ttft().mean), "wall_s": wall}),
              flush=True)


class GenaiRun:
    """The persistent openvino-genai child: `once()` → decode ms per token of one generate."""

    def __init__(self, venv: Path, model_dir: Path, prompt: int, tokens: int, threads: int):
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), __file__, "--genai-child", str(model_dir),
                                      "--prompt", str(prompt), "--tokens", str(tokens), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # ready

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the openvino-genai child exited")
            if line.startswith("{"):
                return json.loads(line)

    def once(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()["tpot_ms"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class SparsecRun:
    """One lowered file of the artifact on a backend, through `open_decoder` (what bench --decode runs)."""

    def __init__(self, artifact: Path, spec: str, prompt: int, tokens: int, threads: int, workdir: Path):
        import numpy as np

        from compiler.registry import Registry
        from runtimes.decode.decoders import DecodeOptions, open_decoder

        backend_name, rel, *cache = spec.split(":")
        manifest = json.loads((artifact / "manifest.json").read_text()) if (artifact / "manifest.json").is_file() \
            else {"lowering": json.loads((artifact / "lowering.json").read_text())}
        backend = Registry.default().get_backend(backend_name)()
        if rel == "auto":  # the file the backend runs by default (sparsec: its packed directory)
            from compiler.lowering.files import model_file

            rel = model_file(manifest["lowering"], backend_name)
        opts = DecodeOptions(prompt_len=prompt, new_tokens=tokens, threads=threads, cache=cache[0] if cache else "auto")
        self.decoder = open_decoder(backend, artifact / rel, manifest["lowering"], opts, workdir)
        self.ids = np.random.default_rng(0).integers(3, 8000, size=(1, prompt)).astype(np.int64)
        self.tokens = tokens
        self.decoder.generate(self.ids, np.ones_like(self.ids), 4)  # warm-up
        self.cache = self.decoder.cache

    def once(self) -> float:
        import numpy as np

        trace = self.decoder.generate(self.ids, np.ones_like(self.ids), self.tokens)
        return float(sum(trace.step_ms) / len(trace.step_ms))

    def close(self) -> None:
        self.decoder.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="a lowered causal-LM artifact (manifest.json or lowering.json)")
    ap.add_argument("--configs", default="openvino:onnx/int8-qdq/model.onnx",
                    help="comma-separated backend:relative/path[:cache][@OTHER_ARTIFACT] (path 'auto': the backend's file)")
    ap.add_argument("--genai", default="int8", help="openvino-genai formats (exported by ovgenai_reference.py)")
    ap.add_argument("--venv", type=Path, default=None, help="the openvino-genai venv (default: SPARSEC_HOME/venvs/ovgenai)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_vs_genai.json")
    ap.add_argument("--genai-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.genai_child:
        genai_child(args.genai_child, args.prompt, args.tokens, args.threads)
        return 0
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    from ovgenai_reference import home

    from runtimes.measure.machine import record_machine
    from runtimes.measure.speedup import speedup

    venv = args.venv or home() / "venvs" / "ovgenai"
    if args.artifact is None or not args.artifact.is_dir():
        print(f"error: --artifact {args.artifact} is not a directory", file=sys.stderr)
        return 2
    formats = [f for f in args.genai.split(",") if f]
    missing = [f for f in formats if not (home() / "ovgenai" / f"smollm2-{f}" / "openvino_model.xml").is_file()]
    if missing or not (venv / "bin" / "python").is_file():
        print(f"error: openvino-genai venv or exports missing ({missing}): run benchmarks/ovgenai_reference.py --install",
              file=sys.stderr)
        return 2
    machine = record_machine(threads=args.threads)
    runs: dict[str, object] = {}
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"decode_vs_genai-{os.getpid()}"
    try:
        for fmt in formats:
            runs[f"openvino-genai {fmt}"] = GenaiRun(venv, home() / "ovgenai" / f"smollm2-{fmt}", args.prompt,
                                                     args.tokens, args.threads)
        for i, spec in enumerate(c for c in args.configs.split(",") if c):
            spec, _, other = spec.partition("@")
            artifact = Path(other) if other else args.artifact
            run = SparsecRun(artifact, spec, args.prompt, args.tokens, args.threads, work / str(i))
            runs[f"sparsec {spec.split(':')[0]} {spec.split(':')[1]} ({run.cache}) [{artifact.name}]"] = run
        names = list(runs)
        ms: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                ms[n].append(runs[n].once())
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1e3 / ms[n][-1]:.1f} tok/s" for n in names),
                  flush=True)
    finally:
        for run in runs.values():
            run.close()
    import numpy as np

    rows = []
    for n in names:
        rows.append({"config": n, "tokens_per_s": float(1e3 / np.median(ms[n])), "ms_per_token_rounds": ms[n]})
    comparisons = []
    for ref in (n for n in names if n.startswith("openvino-genai")):
        for n in (m for m in names if m.startswith("sparsec")):
            est = speedup(ms[ref], ms[n], load=os.getloadavg()[0])
            comparisons.append({"sparsec": n, "reference": ref, **est.to_dict()})
            print(f"{n} vs {ref}: {est.format()} ({est.reason})")
    record = machine.finish().to_dict()
    args.out.write_text(json.dumps({"machine": record, "rows": rows, "comparisons": comparisons,
                                    "prompt": args.prompt, "tokens": args.tokens, "threads": args.threads,
                                    "artifact": repo_relative(args.artifact),
                                    "command": "python benchmarks/decode_vs_genai.py " + " ".join(argv or sys.argv[1:])},
                                   indent=1) + "\n")
    print(f"machine: {machine.summary()}\nwrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
