"""Quality of allocation × pruning method × sparsity, against the dense model, on held-out text.

    python benchmarks/quality.py                       # MiniLM, embedding cosine on the 'eval' corpus
    python benchmarks/quality.py --model .cache/tiny-lm --sparsities 0.5,0.7   # a causal LM: perplexity

Rows: uniform / owl / alphapruning × magnitude / wanda / sparsegpt; columns: unstructured sparsities
and N:M patterns (N:M makes every eligible layer N:M, so it is run with the uniform allocation only:
see passes/nm_structure.py). Calibration samples are built once and shared by every run. Prints a
rich table and writes benchmarks/results/quality.json and quality.png. Bounded: --max-minutes stops
launching new runs (finished ones are kept; `--resume` runs the missing ones later).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from repo_paths import RESULTS


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--allocations", default="uniform,owl,alphapruning")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--patterns", default="2:4", help="comma-separated N:M patterns ('' for none)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--eval-data", default="eval")
    ap.add_argument("--max-texts", type=int, default=128, help="encoders: held-out texts compared")
    ap.add_argument("--max-tokens", type=int, default=8192, help="causal LMs: held-out tokens scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=40.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the missing ones")
    return ap.parse_args()


def configs(args: argparse.Namespace) -> list[dict]:
    allocs = [a for a in args.allocations.split(",") if a]
    methods = [m for m in args.methods.split(",") if m]
    out = [{"allocation": a, "method": m, "setting": f"{float(s):.0%}", "sparsity": float(s), "pattern": None}
           for a in allocs for m in methods for s in args.sparsities.split(",") if s]
    for p in [p for p in args.patterns.split(",") if p]:
        n, m = (int(v) for v in p.split(":"))
        out += [{"allocation": "uniform", "method": meth, "setting": p, "sparsity": 1 - n / m, "pattern": p} for meth in methods]
    return out


def run_one(dense, calib, cfg: dict, reference) -> dict:
    from compiler.compile import shorthand_spec
    from compiler.pass_infra import PassContext
    from compiler.pipeline import Pipeline
    from compiler.registry import Registry

    spec = shorthand_spec(cfg["sparsity"], cfg["allocation"], cfg["method"], cfg["pattern"])
    ir = dense.clone()
    start = time.perf_counter()
    run = Pipeline.from_spec(spec, Registry.default()).run(ir, PassContext(calibration=calib))
    seconds = time.perf_counter() - start
    run.ir.refresh_measured_sparsity()
    names = [n for n, p in run.ir.plan.items() if p.target_sparsity is not None]
    params = sum(run.ir.plan[n].params for n in names)
    measured = sum(run.ir.plan[n].measured_sparsity * run.ir.plan[n].params for n in names) / params
    ev = reference.compare(run.ir)
    return {**cfg, "spec": spec, "compile_seconds": round(seconds, 2), "measured_sparsity": round(measured, 4), **ev}


def markdown(rows: list[dict], meta: dict) -> str:
    """The same table as the console's, as Markdown (written beside the JSON)."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    metric = rows[0]["metric"]
    lines = [f"{meta['model']}: {metric} vs dense ({meta['dense']:.4g}), held-out '{meta['eval_data']}' text; "
             f"calibration {meta['calibration']['samples']} x {meta['calibration']['seqlen']}, {meta['threads']} threads", "",
             "| allocation | method | " + " | ".join(settings) + " |", "|---|---|" + "---:|" * len(settings)]
    for alloc, meth in dict.fromkeys((r["allocation"], r["method"]) for r in rows):
        vals = {r["setting"]: r["compiled"] for r in rows if r["allocation"] == alloc and r["method"] == meth}
        lines.append(f"| {alloc} | {meth} | " + " | ".join(f"{vals[s]:.4g}" if s in vals else "" for s in settings) + " |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict], metric: str):
    from rich.table import Table

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    t = Table(title=f"{metric} vs dense ({'higher' if metric != 'perplexity' else 'lower'} is better)")
    t.add_column("allocation")
    t.add_column("method")
    for s in settings:
        t.add_column(s, justify="right")
    for key in dict.fromkeys((r["allocation"], r["method"]) for r in rows):
        cells = {r["setting"]: r["compiled"] for r in rows if (r["allocation"], r["method"]) == key}
        t.add_row(*key, *[f"{cells[s]:.4f}" if s in cells else "" for s in settings])
    return t


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"uniform": ":", "owl": "-", "alphapruning": "--"}
    colors = {"magnitude": "#999933", "wanda": "#4477aa", "sparsegpt": "#cc6677"}
    for alloc, meth in dict.fromkeys((r["allocation"], r["method"]) for r in rows if r["pattern"] is None):
        pts = sorted((r["sparsity"], r["compiled"]) for r in rows if r["pattern"] is None and (r["allocation"], r["method"]) == (alloc, meth))
        ax.plot(*zip(*pts), styles.get(alloc, "-"), color=colors.get(meth), marker="o", ms=3, label=f"{alloc} / {meth}")
    for r in rows:
        if r["pattern"]:
            ax.plot([r["sparsity"]], [r["compiled"]], "s", color=colors.get(r["method"]), ms=7, mfc="none")
            ax.annotate(f"{r['pattern']} {r['method']}", (r["sparsity"], r["compiled"]), fontsize=6, xytext=(4, 0), textcoords="offset points")
    ax.set_xlabel("sparsity of the pruned layers")
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=3)
    ax.set_title(f"{rows[0].get('model', '')}: {metric} vs dense")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from rich.console import Console

    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.evaluate import EvalConfig, Reference
    from compiler.trace import load_and_trace

    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    console = Console()
    dense = load_and_trace(args.model)
    calib_cfg = CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen)
    calib = build_calibration(dense, calib_cfg)
    eval_cfg = EvalConfig(max_texts=args.max_texts, max_tokens=args.max_tokens)
    reference = Reference.build(dense, args.eval_data, eval_cfg)  # dense embeddings / perplexity, once
    deadline = time.time() + args.max_minutes * 60
    rows, todo = [], configs(args)
    if args.resume and args.out.is_file():
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["model"] == args.model]
        done = {(r["allocation"], r["method"], r["setting"]) for r in rows}
        todo = [c for c in todo if (c["allocation"], c["method"], c["setting"]) not in done]
    for i, cfg in enumerate(todo):
        if time.time() > deadline:
            console.print(f"[yellow]time limit: {len(todo) - i} runs not started[/yellow]")
            break
        row = {"model": args.model, **run_one(dense, calib, cfg, reference)}
        rows.append(row)
        console.print(f"{i + 1}/{len(todo)} {cfg['allocation']:>12} {cfg['method']:>9} {cfg['setting']:>4}: "
                      f"{row['metric']} {row['compiled']:.4f} (measured {row['measured_sparsity']:.3f}, {row['compile_seconds']}s)")
    if not rows:
        return
    order = {(c["allocation"], c["method"], c["setting"]): i for i, c in enumerate(configs(args))}
    rows.sort(key=lambda r: order.get((r["allocation"], r["method"], r["setting"]), len(order)))
    metric = rows[0]["metric"]
    console.print(table(rows, metric))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "calibration": calib.manifest(), "eval": vars(eval_cfg), "eval_data": args.eval_data,
            "dense": rows[0]["dense"], "torch": torch.__version__, "threads": args.threads}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, metric, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out}, its .md and .png")


if __name__ == "__main__":
    main()
