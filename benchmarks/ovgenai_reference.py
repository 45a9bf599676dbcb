"""Reference rows from a runtime's own LLM pipeline: openvino-genai on the same model, prompt, threads and
token count as benchmarks/decode.py (issues 12 and 13: the dense baseline a sparse model must beat).

    python benchmarks/ovgenai_reference.py --weights int8,int4 --out benchmarks/results/ovgenai_smollm2.json

openvino-genai and optimum-intel live in a venv of their own (`--venv`, default
${SPARSEC_HOME:-~/.cache/sparsec}/venvs/ovgenai; created with `--install`): optimum-intel pins its own
transformers/torch, which must not move sparsec's. The model (the built-in SmolLM2-135M-Instruct, converted
from its GGUF by sparsec) is exported once per weight format with `optimum-cli export openvino`
(int4: `--group-size 64 --ratio 1.0`, since hidden 576 is not a multiple of the default 128). Each
format then generates `--tokens` tokens greedily after a `--prompt`-token prompt, `--rounds` times, in a
child process of that venv; the row reports the median tokens/s over rounds (decode throughput as the
pipeline's perf metrics give it) and the time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import RESULTS, repo_relative

EXPORT_ARGS = {"int8": ["--weight-format", "int8"], "int4": ["--weight-format", "int4", "--group-size", "64", "--ratio", "1.0"],
               "fp16": ["--weight-format", "fp16"]}


def home() -> Path:
    return Path(os.environ.get("SPARSEC_HOME") or Path.home() / ".cache" / "sparsec")


def child(model_dir: str, prompt: int, tokens: int, threads: int, rounds: int) -> dict:
    """Runs inside the openvino-genai venv."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    pipe = ov_genai.LLMPipeline(model_dir, "CPU", INFERENCE_NUM_THREADS=threads)
    ids = np.random.default_rng(0).integers(3, 8000, size=(1, prompt)).astype(np.int64)
    inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    config = ov_genai.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, ignore_eos=True, do_sample=False)
    pipe.generate(inputs, config)  # warm-up
    rates, ttft, wall = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        res = pipe.generate(inputs, config)
        wall.append(time.perf_counter() - start)
        m = res.perf_metrics
        rates.append(float(m.get_throughput().mean))
        ttft.append(float(m.get_ttft().mean))
    return {"tokens_per_s": float(np.median(rates)), "tokens_per_s_rounds": rates, "ttft_ms": float(np.median(ttft)),
            "wall_s_rounds": wall, "openvino_genai": ov_genai.__version__ if hasattr(ov_genai, "__version__") else None}


def export(venv: Path, source: Path, fmt: str, out: Path) -> Path:
    if (out / "openvino_model.xml").is_file():
        return out
    cmd = [str(venv / "bin" / "optimum-cli"), "export", "openvino", "--model", str(source), "--task",
           "text-generation-with-past", *EXPORT_ARGS[fmt], str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def install(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "optimum-intel[openvino]", "openvino-genai", "openvino-tokenizers"], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=home() / "venvs" / "ovgenai")
    ap.add_argument("--install", action="store_true", help="create the venv first")
    ap.add_argument("--weights", default="int8,int4")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "ovgenai_smollm2.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.prompt, args.tokens, args.threads, args.rounds)))
        return 0
    if args.install:
        install(args.venv)
    if not (args.venv / "bin" / "python").is_file():
        print(f"error: no openvino-genai venv at {args.venv}: run with --install", file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compiler.trace import builtin_model_path
    from runtimes.measure.machine import record_machine

    source = builtin_model_path("smollm2")
    machine = record_machine(threads=args.threads)
    rows = []
    for fmt in [w for w in args.weights.split(",") if w]:
        model = export(args.venv, source, fmt, home() / "ovgenai" / f"smollm2-{fmt}")
        proc = subprocess.run([str(args.venv / "bin" / "python"), __file__, "--child", str(model), "--prompt", str(args.prompt),
                               "--tokens", str(args.tokens), "--threads", str(args.threads), "--rounds", str(args.rounds)],
                              capture_output=True, text=True, check=True)
        row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        row.update(engine="openvino-genai", weights=fmt, model="smollm2", prompt_len=args.prompt, new_tokens=args.tokens,
                   threads=args.threads, load_average=os.getloadavg()[0])
        rows.append(row)
        print(f"openvino-genai {fmt}: {row['tokens_per_s']:.1f} tokens/s (rounds {[round(r, 1) for r in row['tokens_per_s_rounds']]}), "
              f"TTFT {row['ttft_ms']:.1f} ms")
    args.out.write_text(json.dumps({"machine": machine.finish().to_dict(), "rows": rows,
                                    "command": "python benchmarks/ovgenai_reference.py " + " ".join(argv or sys.argv[1:])},
                                   indent=1) + "\n")
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
