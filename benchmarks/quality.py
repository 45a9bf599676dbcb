"""Quality of allocation × pruning method × sparsity, against the dense model, on held-out text.

    python benchmarks/quality.py                       # MiniLM, embedding cosine on the 'eval' corpus
    python benchmarks/quality.py --model .cache/tiny-lm --sparsities 0.5,0.7   # a causal LM: perplexity
    python benchmarks/quality.py --model smollm2 --allocations uniform,auto --methods wanda,sparsegpt \
        --recover none,reconstruct,prune-grow,finetune --out benchmarks/results/quality_smollm2.json

Rows: uniform / owl / alphapruning × magnitude / wanda / sparsegpt; columns: unstructured sparsities
and N:M patterns (N:M makes every eligible layer N:M, so it is run with the uniform allocation only:
see passes/nm_structure.py). `--recover` adds, per pruned model, one row per recovery variant (a pass
spec or several joined by '+', e.g. `prune-grow+reconstruct`; `none` = the pruned model itself):
each variant runs on a copy of the same pruned model. Rows carry wall and CPU seconds of the prune
pipeline and of the recovery, and (LMs) next-token top-1 agreement with the dense model; the meta
records the CPU seconds of one dense forward over the calibration set (the compile-cost yardstick).
Calibration samples are built once and shared by every run. Prints a
rich table and writes benchmarks/results/quality.json and quality.png. Bounded: --max-minutes stops
launching new runs (finished ones are kept; `--resume` runs the missing ones later).

`--cells` runs an explicit list in the order given (most informative first), each with its own recovery
variants, e.g. `--cells "uniform/wanda/0.5,owl/wanda/0.5/none;prune-grow,uniform/wanda/2:4"`;
`--merge` keeps the rows other runs already wrote to --out (under a file lock), so two processes can
fill one grid. The meta records the command, CPU model, `uptime`, and each row its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
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
    ap.add_argument("--recover", default="none", help="recovery variants per pruned model: none,reconstruct,prune-grow,finetune,...")
    ap.add_argument("--greedy-prompts", type=int, default=0, help="LMs: greedy-continuation prompts per evaluation (0: skip)")
    ap.add_argument("--cells", default="", help="ordered ALLOC/METHOD/SETTING[/REC;REC...] list (SETTING: 0.5 or 2:4); "
                    "overrides --allocations/--methods/--sparsities/--patterns")
    ap.add_argument("--merge", action="store_true", help="keep rows other runs wrote to --out (file-locked writes)")
    return ap.parse_args()


def _cell(text: str) -> dict:
    parts = text.strip().split("/")
    if len(parts) not in (3, 4):
        raise SystemExit(f"error: --cells entry '{text}' is not ALLOC/METHOD/SETTING[/REC;REC]")
    alloc, meth, setting = parts[:3]
    if ":" in setting:
        n, m = (int(v) for v in setting.split(":"))
        cfg = {"allocation": alloc, "method": meth, "setting": setting, "sparsity": 1 - n / m, "pattern": setting}
    else:
        cfg = {"allocation": alloc, "method": meth, "setting": f"{float(setting):.0%}", "sparsity": float(setting), "pattern": None}
    if len(parts) == 4:
        cfg["recover"] = [r for r in parts[3].split(";") if r]
    return cfg


def configs(args: argparse.Namespace) -> list[dict]:
    if args.cells:
        return [_cell(c) for c in args.cells.split(",") if c.strip()]
    allocs = [a for a in args.allocations.split(",") if a]
    methods = [m for m in args.methods.split(",") if m]
    out = [{"allocation": a, "method": m, "setting": f"{float(s):.0%}", "sparsity": float(s), "pattern": None}
           for a in allocs for m in methods for s in args.sparsities.split(",") if s]
    for p in [p for p in args.patterns.split(",") if p]:
        n, m = (int(v) for v in p.split(":"))
        out += [{"allocation": "uniform", "method": meth, "setting": p, "sparsity": 1 - n / m, "pattern": p} for meth in methods]
    return out


def _measured(ir) -> float:
    names = [n for n, p in ir.plan.items() if p.target_sparsity is not None]
    params = sum(ir.plan[n].params for n in names)
    return sum(ir.plan[n].measured_sparsity * ir.plan[n].params for n in names) / params


def _timed_run(spec: str, ir, ctx):
    from compiler.pipeline import Pipeline
    from compiler.registry import Registry

    wall, cpu = time.perf_counter(), time.process_time()
    run = Pipeline.from_spec(spec, Registry.default()).run(ir, ctx)
    run.ir.refresh_measured_sparsity()
    return run, round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def run_one(dense, calib, cfg: dict, reference, recoveries: list[str]) -> Iterator[dict]:
    """Prune once, then evaluate the pruned model and each recovery variant applied to a copy of it
    (one row at a time, so the caller can save each as soon as it is measured)."""
    from compiler.compile import shorthand_spec
    from compiler.pass_infra import PassContext

    cfg = dict(cfg)
    recoveries = cfg.pop("recover", recoveries)
    spec = shorthand_spec(cfg["sparsity"], cfg["allocation"], cfg["method"], cfg["pattern"])
    ctx = PassContext(calibration=calib, extras={"dense": dense})
    run, seconds, cpu = _timed_run(spec, dense.clone(), ctx)
    pruned = run.ir
    for rec in recoveries:
        base = {**cfg, "recovery": rec, "spec": spec, "compile_seconds": seconds, "compile_cpu_seconds": cpu,
                "pass_seconds": {r.name: round(r.seconds, 2) for r in run.records}}
        if rec == "none":
            model, extra = pruned, {}
        else:
            rec_spec = rec.replace("+", ",")
            rrun, rsec, rcpu = _timed_run(rec_spec, pruned.clone(), ctx)
            model = rrun.ir
            extra = {"recovery_spec": rrun.records and ",".join(r.spec for r in rrun.records), "recovery_seconds": rsec,
                     "recovery_cpu_seconds": rcpu,
                     "recovery_metrics": {r.name: {k: v for k, v in r.metrics.items() if not isinstance(v, (dict, list))}
                                          for r in rrun.records}}
        yield {**base, **extra, "measured_sparsity": round(_measured(model), 4), **reference.compare(model),
               "load_average": [round(v, 2) for v in os.getloadavg()]}


def dense_forward_cpu(dense, calib) -> dict:
    """CPU and wall seconds of one dense forward over the calibration set (batched, one call per 4096 tokens)."""
    from compiler.trace import call_model

    samples = calib.samples
    per = max(1, 4096 // max(1, samples[0]["input_ids"].shape[-1])) if "input_ids" in samples[0] else 1
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(samples), per):
            chunk = samples[i : i + per]
            batch = {k: torch.cat([s[k] for s in chunk]) for k in chunk[0]}
            call_model(dense.module, batch)
    return {"dense_forward_seconds": round(time.perf_counter() - wall, 2), "dense_forward_cpu_seconds": round(time.process_time() - cpu, 2)}


def markdown(rows: list[dict], meta: dict) -> str:
    """The same table as the console's, as Markdown (written beside the JSON)."""
    settings = sorted(dict.fromkeys(r["setting"] for r in rows), key=lambda s: (":" in s, s))
    metric = rows[0]["metric"]
    lines = [f"{meta['model']}: {metric} vs dense ({meta['dense']:.4g}), held-out '{meta['eval_data']}' text; "
             f"calibration {meta['calibration']['samples']} x {meta['calibration']['seqlen']}, {meta['threads']} threads", "",
             *[f"Command: `{c}`" for c in meta.get("commands", [])], "",
             *([f"CPU: {meta['cpu']}; `uptime` at the last write: {meta['uptime']}", ""] if meta.get("uptime") else []),
             "| allocation | method | recovery | " + " | ".join(settings) + " |", "|---|---|---|" + "---:|" * len(settings)]
    agree = "top1_agreement" in rows[0]
    for alloc, meth, rec in dict.fromkeys((r["allocation"], r["method"], r.get("recovery", "none")) for r in rows):
        vals = {r["setting"]: r for r in rows if (r["allocation"], r["method"], r.get("recovery", "none")) == (alloc, meth, rec)}
        cell = (lambda r: f"{r['compiled']:.4g} ({100 * r['top1_agreement']:.1f}%)") if agree else (lambda r: f"{r['compiled']:.4g}")
        lines.append(f"| {alloc} | {meth} | {rec} | " + " | ".join(cell(vals[s]) if s in vals else "" for s in settings) + " |")
    if agree:
        lines += ["", "Cells: perplexity (next-token top-1 agreement with the dense model)."]
    lines += ["", "Seconds (wall / CPU) — prune pipeline, then each recovery:", "",
              "| allocation | method | recovery | setting | prune s | prune CPU s | recovery s | recovery CPU s |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['allocation']} | {r['method']} | {r.get('recovery', 'none')} | {r['setting']} | {r['compile_seconds']} | "
                     f"{r.get('compile_cpu_seconds', '')} | {r.get('recovery_seconds', '')} | {r.get('recovery_cpu_seconds', '')} |")
    missing = [c for c in meta.get("requested", []) if c not in {_key(r) for r in rows}]
    if missing:
        lines += ["", "Requested but not run (yet): " + ", ".join(" / ".join(c) for c in missing) + "."]
    if meta.get("dense_forward_cpu_seconds") is not None:
        lines += ["", f"One dense forward over the calibration set: {meta['dense_forward_seconds']} s wall, "
                  f"{meta['dense_forward_cpu_seconds']} CPU s."]
    return "\n".join(lines) + "\n"


def table(rows: list[dict], metric: str):
    from rich.table import Table

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    t = Table(title=f"{metric} vs dense ({'higher' if metric != 'perplexity' else 'lower'} is better)")
    t.add_column("allocation")
    t.add_column("method")
    for s in settings:
        t.add_column(s, justify="right")
    t.add_column("recovery")
    for key in dict.fromkeys((r["allocation"], r["method"], r.get("recovery", "none")) for r in rows):
        cells = {r["setting"]: r["compiled"] for r in rows if (r["allocation"], r["method"], r.get("recovery", "none")) == key}
        t.add_row(key[0], key[1], *[f"{cells[s]:.4f}" if s in cells else "" for s in settings], key[2])
    return t


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"uniform": ":", "owl": "-", "alphapruning": "--"}
    colors = {"magnitude": "#999933", "wanda": "#4477aa", "sparsegpt": "#cc6677"}
    for alloc, meth, rec in dict.fromkeys((r["allocation"], r["method"], r.get("recovery", "none")) for r in rows if r["pattern"] is None):
        pts = sorted((r["sparsity"], r["compiled"]) for r in rows if r["pattern"] is None
                     and (r["allocation"], r["method"], r.get("recovery", "none")) == (alloc, meth, rec))
        label = f"{alloc} / {meth}" + ("" if rec == "none" else f" + {rec}")
        ax.plot(*zip(*pts), styles.get(alloc, "-"), color=colors.get(meth), marker="o" if rec == "none" else "^", ms=3, label=label)
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
    eval_cfg = EvalConfig(max_texts=args.max_texts, max_tokens=args.max_tokens, greedy_prompts=args.greedy_prompts)
    reference = Reference.build(dense, args.eval_data, eval_cfg)  # dense embeddings / perplexity, once
    cost = dense_forward_cpu(dense, calib)
    recoveries = [r for r in args.recover.split(",") if r]
    deadline = time.time() + args.max_minutes * 60
    rows, todo = [], configs(args)
    if args.resume and args.out.is_file():
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["model"] == args.model]
        done = {_key(r) for r in rows}
        todo = [{**c, "recover": [x for x in c.get("recover", recoveries) if (c["allocation"], c["method"], c["setting"], x) not in done]}
                for c in todo]
        todo = [c for c in todo if c["recover"]]
    for i, cfg in enumerate(todo):
        if time.time() > deadline:
            console.print(f"[yellow]time limit: {len(todo) - i} runs not started[/yellow]")
            break
        for row in run_one(dense, calib, cfg, reference, recoveries):
            row = {"model": args.model, **row}
            rows.append(row)
            agree = f", top-1 {100 * row['top1_agreement']:.1f}%" if "top1_agreement" in row else ""
            console.print(f"{i + 1}/{len(todo)} {cfg['allocation']:>12} {cfg['method']:>9} {cfg['setting']:>4} {row['recovery']:>22}: "
                          f"{row['metric']} {row['compiled']:.4f}{agree} (measured {row['measured_sparsity']:.3f}, "
                          f"prune {row['compile_seconds']}s, recovery {row.get('recovery_seconds', 0)}s)", highlight=False)
            _write(args, rows, calib, eval_cfg, cost, console, final=False)
    if not rows:
        return
    _write(args, rows, calib, eval_cfg, cost, console, final=True)


def _key(r: dict) -> tuple:
    return (r["allocation"], r["method"], r["setting"], r.get("recovery", "none"))


def _requested(args: argparse.Namespace) -> list[tuple]:
    recoveries = [r for r in args.recover.split(",") if r]
    return [(c["allocation"], c["method"], c["setting"], rec) for c in configs(args) for rec in c.get("recover", recoveries)]


def _machine() -> dict:
    """CPU model and `uptime` (figures from a shared machine are read against its load)."""
    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}), {os.cpu_count()} CPUs"
    except OSError:
        pass
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        up = ""
    return {"cpu": cpu, "uptime": up}


def _write(args, rows, calib, eval_cfg, cost, console, final: bool) -> None:
    """Results so far (after every row, so an interrupted run keeps what it measured)."""
    import fcntl

    args.out.parent.mkdir(parents=True, exist_ok=True)
    requested = _requested(args)
    commands = ["python " + " ".join(["benchmarks/quality.py", *sys.argv[1:]])]
    with open(args.out, "a+") as lock:  # --merge: another process may write the same file
        fcntl.flock(lock, fcntl.LOCK_EX)
        mine = {_key(r) for r in rows}
        out_rows = list(rows)
        if args.merge and args.out.stat().st_size:
            old = json.loads(args.out.read_text())
            out_rows += [r for r in old["rows"] if r["model"] == args.model and _key(r) not in mine]
            requested += [tuple(c) for c in old["meta"].get("requested", []) if tuple(c) not in requested]
            commands += [c for c in old["meta"].get("commands", []) if c not in commands]
        order = {c: i for i, c in enumerate(requested)}
        out_rows.sort(key=lambda r: order.get(_key(r), len(order)))
        metric = out_rows[0]["metric"]
        meta = {"model": args.model, "calibration": calib.manifest(), "eval": vars(eval_cfg), "eval_data": args.eval_data,
                "dense": out_rows[0]["dense"], "torch": torch.__version__, "threads": args.threads, **cost,
                "load_average": os.getloadavg(), "commands": commands,
                **_machine(), "requested": requested}
        args.out.write_text(json.dumps({"meta": meta, "rows": out_rows}, indent=1, default=str))
        args.out.with_suffix(".md").write_text(markdown(out_rows, meta))
    rows = out_rows
    if final:
        console.print(table(rows, metric))
        plot(rows, metric, args.out.with_suffix(".png"))
        console.print(f"wrote {args.out}, its .md and .png")


if __name__ == "__main__":
    main()
