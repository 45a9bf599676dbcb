"""Uniform vs OWL (paper defaults) vs `sparsity-allocation{method=auto}`, Wanda, on text nobody saw.

    python examples/train_tiny_lm.py --out .cache/tiny-lm --threads 1     # the trained tiny LM (cached)
    python benchmarks/auto_allocation.py                                  # MiniLM + tiny LM, 50-80 %

Calibration (32 x 128 tokens of stdlib docstrings, the compile default) is built once per model and
shared by the three allocations; auto holds out 25 % of it to choose. Quality is measured on the
`eval` corpus (stdlib modules disjoint from calibration): embedding cosine vs dense for MiniLM,
perplexity for the LM. Also reported: the time of auto's search and of the plain pruning pass after
it. Writes benchmarks/results/auto_allocation.{json,md,png}. Bounded by --max-minutes (no new run
starts after it; finished rows are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from repo_paths import RESULTS

OWL_PAPER = "lam=0.08"  # OWL's defaults: λ = 0.08, m = 5 (outlier-analysis default)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,.cache/tiny-lm")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--max-texts", type=int, default=128, help="encoders: held-out texts compared")
    ap.add_argument("--max-tokens", type=int, default=8192, help="causal LMs: held-out tokens scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=15.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "auto_allocation.json")
    return ap.parse_args()


def run_spec(ir, spec: str, calib):
    from compiler.pass_infra import PassContext
    from compiler.pipeline import Pipeline
    from compiler.registry import Registry

    return Pipeline.from_spec(spec, Registry.default()).run(ir, PassContext(calibration=calib))


def seconds_of(run, name: str) -> float:
    return sum(r.seconds for r in run.records if r.name == name)


def bench_level(dense, analysed, calib, reference, s: float, method: str) -> dict:
    prune = f"prune{{method={method}}}"
    uni = run_spec(dense.clone(), f"sparsity-allocation{{method=uniform,target={s!r}}},{prune}", calib)
    owl = run_spec(analysed.clone(), f"sparsity-allocation{{method=owl,target={s!r},{OWL_PAPER}}},{prune}", calib)
    auto = run_spec(dense.clone(), f"sparsity-allocation{{method=auto,target={s!r},prune_method={method}}},{prune}", calib)
    m = auto.records[0].metrics
    rows = {k: reference.compare(r.ir) for k, r in (("uniform", uni), ("owl", owl), ("auto", auto))}
    prune_s = seconds_of(uni, "prune")
    return {
        "sparsity": s, "metric": rows["uniform"]["metric"], "dense": rows["uniform"]["dense"],
        "uniform": rows["uniform"]["compiled"], "owl": rows["owl"]["compiled"], "auto": rows["auto"]["compiled"],
        "winner": m["winner"], "winner_heldout": m["winner_score"], "uniform_heldout": m["uniform_score"],
        "fidelity": m["fidelity"], "auto_seconds": round(m["auto_seconds"], 2), "auto_detail": m["auto_seconds_detail"],
        "prune_seconds": round(prune_s, 2), "auto_prune_seconds": round(seconds_of(auto, "prune"), 2),
        "auto_over_prune": round(m["auto_seconds"] / prune_s, 3) if prune_s else None,
        "winner_block_sparsity": next(c["block_sparsity"] for c in m["candidates"] if c["name"] == m["winner"]),
        "candidates": [{"name": c["name"], "score": c["score"], "duplicate_of": c.get("duplicate_of")} for c in m["candidates"]],
    }


def better(metric: str, a: float, b: float) -> float:
    """How much a beats b (positive = better), in the metric's direction."""
    return b - a if metric == "perplexity" else a - b


def markdown(rows: list[dict]) -> str:
    lines = ["| model | sparsity | metric | uniform | OWL (λ=0.08, M=5) | auto | auto − best(uniform, OWL) "
             "| auto's pick | auto s | prune s | auto/prune |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        best = r["uniform"] if better(r["metric"], r["uniform"], r["owl"]) >= 0 else r["owl"]
        metric = "ppl ↓" if r["metric"] == "perplexity" else "cosine ↑"
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {metric} | {r['uniform']:.4f} | {r['owl']:.4f} | {r['auto']:.4f} | "
                     f"{better(r['metric'], r['auto'], best):+.4f} | {r['winner']} | {r['auto_seconds']:.1f} | "
                     f"{r['prune_seconds']:.1f} | {r['auto_over_prune']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in mine]
        for key, style in (("uniform", ":o"), ("owl", "--s"), ("auto", "-^")):
            ax.plot(xs, [r[key] for r in mine], style, label="OWL (paper)" if key == "owl" else key)
        for r in mine:
            ax.annotate(r["winner"], (r["sparsity"], r["auto"]), fontsize=6, xytext=(3, 4), textcoords="offset points")
        metric = mine[0]["metric"]
        ax.set_xlabel("sparsity (Wanda)")
        ax.set_ylabel(metric)
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_title(f"{Path(model).name}: {metric} on held-out text")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.evaluate import EvalConfig, Reference
    from compiler.trace import load_and_trace

    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    console = Console()
    deadline = time.time() + args.max_minutes * 60
    rows, meta = [], {"torch": torch.__version__, "threads": args.threads, "method": args.method, "models": {}}
    for model in [m for m in args.models.split(",") if m]:
        if time.time() > deadline:
            console.print(f"[yellow]time limit: {model} not started[/yellow]")
            break
        dense = load_and_trace(model)
        calib = build_calibration(dense, CalibrationConfig(samples=args.calib_samples, seqlen=args.calib_seqlen))
        reference = Reference.build(dense, "eval", EvalConfig(max_texts=args.max_texts, max_tokens=args.max_tokens))
        analysed = run_spec(dense.clone(), "outlier-analysis", calib).ir  # OWL's statistics, once per model
        meta["models"][model] = {"calibration": calib.manifest(), "block_outlier_ratio": analysed.analyses["block_outlier_ratio"]}
        for s in [float(x) for x in args.sparsities.split(",") if x]:
            if time.time() > deadline:
                console.print(f"[yellow]time limit: {model} {s:.0%} not started[/yellow]")
                break
            row = {"model": model, **bench_level(dense, analysed, calib, reference, s, args.method)}
            rows.append(row)
            console.print(f"{model} {s:.0%}: uniform {row['uniform']:.4f} owl {row['owl']:.4f} auto {row['auto']:.4f} "
                          f"({row['winner']}; search {row['auto_seconds']}s, prune {row['prune_seconds']}s)")
    if not rows:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    console.print(table)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    plot(rows, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} (.md, .png)")


if __name__ == "__main__":
    main()
