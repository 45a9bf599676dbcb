"""The peer: llm-compressor's own SparseGPT / Wanda (with and without its OWL profile) on SmolLM2, on OUR
calibration tokens, scored by OUR held-out evaluation — beside sparsec's own rows, run in the same process (issue 14).

    python benchmarks/llmcompressor_peer.py --install          # its venv (once; see below)
    python benchmarks/llmcompressor_peer.py --cells sparsegpt/0.5,sparsegpt/0.5/owl,wanda/0.5,wanda/0.5/owl

How it runs: this process (our venv) loads the built-in SmolLM2 exactly as `benchmarks/quality.py` does,
builds the same calibration set (`--calib-samples` × `--calib-seqlen` tokens, same seed) and the same dense
reference (held-out `eval` corpus, `--max-tokens` tokens), writes the calibration token ids to a file and
starts one child per cell in llm-compressor's venv (SPARSEC_HOME/venvs/llmcompressor). The child runs
`llmcompressor.oneshot` with `SparseGPTModifier` / `WandaPruningModifier` (`sparsity`, `mask_structure="0:0"`,
`targets=["Linear"]`, `ignore=["re:.*lm_head"]`; with `sparsity_profile="owl"`, `owl_m=5`, `owl_lmbda=0.08` —
OWL's published defaults, which it requires spelled out and our `owl` allocation uses) on those token ids
as a `datasets.Dataset`, times the oneshot call (wall and CPU seconds of the child process: model loading
and saving excluded), and saves the pruned Linear weights. This process loads
them into the dense model and scores them with `compiler.evaluate.Reference.compare` — perplexity and
next-token top-1 agreement with the dense model — then runs sparsec's own pass pipeline for the same cell
(`benchmarks/quality.py`'s `run_one`: uniform allocation, or OWL at its defaults for the peer's OWL profile;
same calibration samples, same reference), timed the same way (wall and CPU seconds of the prune pipeline).

The venv: llm-compressor 0.14 pins transformers 5.17 (ours: 5.24) and would pull a CUDA torch from the
registry. `--install` makes a venv whose `.pth` file puts our venv's site-packages (its CPU torch) after its
own, then `pip install llmcompressor==0.14.0.1` adds only what is missing (transformers 5.17 among them,
shadowing ours inside the child only). The child imports nothing of sparsec.
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

LLMC_VERSION = "0.14.0.1"


def venv_dir() -> Path:
    from ovgenai_reference import home

    return home() / "venvs" / "llmcompressor"


def install(venv: Path) -> None:
    import site

    subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)  # the Python our venv runs
    own = next(Path(p) for p in (venv / "lib").glob("python3.*/site-packages"))
    (own / "zz_sparsec_main.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", f"llmcompressor=={LLMC_VERSION}"], check=True)


# -- the child (llm-compressor's venv) ---------------------------------------------------------------
def child(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    ids = json.loads(Path(job["calibration"]).read_text())
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    kwargs = dict(sparsity=job["sparsity"], mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    if job["owl"]:  # it requires M and λ: OWL's published defaults, which our owl allocation uses too
        kwargs.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    if job["method"] == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    recipe = Modifier(**kwargs)
    wall, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=len(ids[0]), output_dir=None, save_compressed=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    weights = {n: m.weight.detach().contiguous() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    save_file({f"{n}.weight": w for n, w in weights.items()}, job["out"])
    import llmcompressor

    return {"oneshot_seconds": round(wall, 2), "oneshot_cpu_seconds": round(cpu, 2),
            "llmcompressor": llmcompressor.__version__, "transformers": __import__("transformers").__version__,
            "torch": torch.__version__, "recipe": f"{Modifier.__name__}({kwargs})"}


# -- the parent (our venv) ---------------------------------------------------------------------------
def parse_cell(text: str) -> dict:
    parts = text.split("/")
    if len(parts) not in (2, 3) or parts[0] not in ("sparsegpt", "wanda") or (len(parts) == 3 and parts[2] != "owl"):
        raise SystemExit(f"error: cell '{text}' is not METHOD/SPARSITY[/owl] (METHOD: sparsegpt, wanda)")
    return {"method": parts[0], "sparsity": float(parts[1]), "owl": len(parts) == 3}


def ours(dense, calib, reference, cell: dict) -> dict:
    """sparsec's row for the same cell, on the same calibration set and evaluation: uniform allocation (or
    OWL at its paper defaults when the peer runs its OWL profile), the same method, no recovery."""
    from quality import run_one

    cfg = {"allocation": "owl" if cell["owl"] else "uniform", "method": cell["method"],
           "setting": f"{cell['sparsity']:.0%}", "sparsity": cell["sparsity"], "pattern": None}
    row = next(run_one(dense, calib, cfg, reference, ["none"]))
    return {k: row.get(k) for k in ("spec", "compiled", "top1_agreement", "compile_seconds", "compile_cpu_seconds",
                                    "measured_sparsity")}


def write(args: argparse.Namespace, machine, rows: list[dict], calib, final: bool = False) -> None:
    """--out after every cell (a long run keeps what it measured); the machine record is closed at the end."""
    record = machine.finish().to_dict() if final else {"partial": True}
    args.out.write_text(json.dumps({"machine": record, "rows": rows, "calibration": calib.manifest(),
                                    "eval": {"data": "eval", "max_tokens": args.max_tokens},
                                    "command": "python benchmarks/llmcompressor_peer.py " + " ".join(sys.argv[1:])},
                                   indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="sparsegpt/0.5,sparsegpt/0.5/owl,wanda/0.5,wanda/0.5/owl")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--install", action="store_true", help="create llm-compressor's venv, then exit")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_smollm2_llmcompressor.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return 0
    venv = venv_dir()
    if args.install:
        install(venv)
        return 0
    cells = [parse_cell(c) for c in args.cells.split(",") if c]
    if not (venv / "bin" / "python").is_file():
        print(f"error: no llm-compressor venv at {venv}: run {repo_relative(Path(__file__))} --install", file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file

    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.evaluate import EvalConfig, Reference
    from compiler.trace import builtin_model_path, load_and_trace
    from runtimes.measure.machine import record_machine

    torch.set_num_threads(args.threads)
    machine = record_machine(args.threads)
    dense = load_and_trace("smollm2")
    calib = build_calibration(dense, CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen))
    reference = Reference.build(dense, "eval", EvalConfig(max_tokens=args.max_tokens, greedy_prompts=0))  # as the grid
    work = ROOT / ".cache" / "llmcompressor-peer"
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calibration_ids.json"
    calib_file.write_text(json.dumps([s["input_ids"][0].tolist() for s in calib.samples]))
    rows = []
    for cell in cells:
        name = f"{cell['method']}-{cell['sparsity']}{'-owl' if cell['owl'] else ''}"
        job = {**cell, "model_dir": str(builtin_model_path("smollm2")), "calibration": str(calib_file),
               "threads": args.threads, "out": str(work / f"{name}.safetensors")}
        job_file = work / f"{name}.json"
        job_file.write_text(json.dumps(job))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--child", str(job_file)],
                              capture_output=True, text=True, env=env, cwd=str(ROOT / "benchmarks"))
        if proc.returncode != 0:  # the peer's own failure is a result too (its OWL profile in 0.14.0.1): recorded
            last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
            rows.append({"peer": "llm-compressor", **cell, "error": last[0], "ours": ours(dense, calib, reference, cell)})
            write(args, machine, rows, calib)
            print(f"{name}: llm-compressor failed: {last[0]}", flush=True)
            continue
        meta = json.loads(proc.stdout.strip().splitlines()[-1])
        pruned = dense.clone()
        weights = load_file(job["out"])
        with torch.no_grad():
            for key, w in weights.items():
                pruned.module.get_submodule(key.removesuffix(".weight")).weight.copy_(w)
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        row = {"peer": "llm-compressor", **cell, **meta, "measured_sparsity": round(zeros / total, 4),
               **reference.compare(pruned), "ours": ours(dense, calib, reference, cell),
               "load_average": [round(v, 2) for v in os.getloadavg()]}
        rows.append(row)
        mine = row["ours"] or {}
        write(args, machine, rows, calib)
        print(f"{name}: llm-compressor perplexity {row['compiled']:.2f} (top-1 {100 * row['top1_agreement']:.1f} %, "
              f"{meta['oneshot_cpu_seconds']} CPU s)  |  sparsec {mine.get('compiled', float('nan')):.2f} "
              f"({mine.get('compile_cpu_seconds')} CPU s)", flush=True)
    write(args, machine, rows, calib, final=True)
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
