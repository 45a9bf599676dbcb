"""`sparsec verify` and `sparsec bench`: run a compiled artifact on backends against its dense reference.

Exit codes: 0 ok, 1 bad input (tampered artifact, bad numbers), 2 verification gates missed,
3 a requested backend is unknown or not installed here (the message says how to install it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from compiler.cli_lower import registry_with
from compiler.errors import SparsecError
from compiler.report import inconclusive_lines, speedup_text


def _backends(text: str | None, art) -> tuple[str, ...]:
    """The backends to run: --backend, else those verified before, else those lowered for, else onnxruntime.
    Refused (pointing to `sparsec lower`) when the artifact is not lowered for one of them."""
    from compiler.cli_lower import lowered_for, parse_backends
    from runtimes.registry_helpers import check_backends_available

    lowered = lowered_for(art.manifest, art.report)
    names = parse_backends(text) if text else tuple(art.report.get("backends", {})) or tuple(lowered) or ("onnxruntime",)
    registry = registry_with(names)
    check_backends_available(registry, names)  # unknown or not installed: exit 3 first
    missing = names if not art.manifest.get("lowering") else _not_lowered_for(art.manifest, names, registry)
    if missing:
        what = "has no lowered model" if not art.manifest.get("lowering") else f"is not lowered for {', '.join(missing)}"
        raise SparsecError(f"artifact '{art.root}' {what}: run `sparsec lower {art.root} --backend {','.join(names)}` "
                           "(or compile with --backend)")
    return names


def _not_lowered_for(manifest: dict, names: tuple[str, ...], registry) -> list[str]:
    """Backends the artifact's lowering does not serve: the generic ONNX graph serves any backend, except one
    with a lowered form of its own (`Backend.lower`) or, in a quantized plan, a per-backend variant."""
    from runtimes.base import Backend

    lowering = manifest["lowering"]
    recorded = lowering.get("lowered_for")
    if recorded is None:  # lowered by an older compile: its backends are unknown
        return []
    quantized = any(p.get("quant") for p in manifest.get("plan", {}).values())
    own_form = {n for n in names if registry.get_backend(n).lower is not Backend.lower}
    served = set(recorded) | set(lowering.get("backend_files") or {})  # a variant written for it counts
    return [n for n in names if n not in served and (quantized or n in own_form)]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@click.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", "backends", help="Comma-separated backends (default: those verified before, else onnxruntime).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--seqlen", type=int, default=128, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per configuration (interleaved).")
@click.option("--decode-tokens", type=int, default=32, show_default=True, help="Causal LMs: greedy tokens decoded per timing round.")
@click.option("--min-speedup", type=float, help="Gate: exit 2 when speedup vs dense (same backend) is below this.")
@click.option("--max-accuracy-drop", type=float, help="Gate: exit 2 when 1 - cosine vs dense exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-backend results as JSON.")
def verify_cmd(artifact, backends, batch_size, seqlen, threads, runs, decode_tokens, min_speedup, max_accuracy_drop, as_json):
    """Verify ARTIFACT on backends: accuracy and latency vs its dense reference; updates report.json/report.md."""
    from compiler.artifact import REPORT_JSON, REPORT_MD, Artifact
    from compiler.errors import raise_for_gates
    from compiler.report import render_markdown
    from runtimes.measure.verify import VerifyOptions, verify_backends

    options = {"batch_size": batch_size, "seqlen": seqlen, "threads": threads, "runs": runs, "decode_tokens": decode_tokens,
               "min_speedup": min_speedup, "max_accuracy_drop": max_accuracy_drop}
    VerifyOptions.from_dict(options)  # bad numbers fail before any loading
    art = Artifact.load(artifact)
    art.require_full("verify")
    names = _backends(backends, art)
    results = verify_backends(art.root, art.manifest, names, registry_with(names), options)
    report = art.report
    report.setdefault("backends", {}).update(results)
    _write_text_atomic(art.root / REPORT_MD, render_markdown(report, art.manifest))
    art.update(files={REPORT_JSON: report})
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
    else:
        _print_results(results)
    raise_for_gates(results, f"see {art.root}/report.md")


def _print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("backend", "dense p50 ms", "compiled p50 ms", "speedup [95% CI] verdict", "vs fastest dense", "cosine",
                  "max abs diff", "precision", "sparse kernels", "passed")
    for name, r in results.items():
        table.add_row(name, f"{r['dense_p50_ms']:.2f}", f"{r['compiled_p50_ms']:.2f}", speedup_text(r),
                      f"{r['speedup_vs_fastest_dense']:.2f}x", f"{r['cosine']:.4f}", f"{r['max_abs_diff']:.3g}",
                      str(r.get("precision")), str(r.get("sparse_kernels")), str(r["passed"]))
    console = Console()
    console.print(table)
    any_r = next(iter(results.values()))
    fastest = any_r["fastest_dense"]
    rounds = (any_r.get("timing") or {}).get("rounds", any_r["runs"])
    console.print(f"batch {any_r['batch_size']}, seqlen {any_r['seqlen']}, {any_r['threads']} threads, {rounds} "
                  f"paired interleaved rounds; fastest dense: {fastest['backend']} / {fastest['config']} {fastest['p50_ms']:.2f} ms")
    if any_r.get("machine"):
        from runtimes.measure.machine import MachineRecord

        console.print(f"machine: {MachineRecord(**any_r['machine']).summary()}")
    for line in inconclusive_lines(results):
        console.print(line, style="bold yellow", markup=False)
    echo_quality({"backends": results})
    for name, r in results.items():
        if "decode" in r:
            d = r["decode"]
            console.print(f"{name} decode ({d['new_tokens']} greedy tokens, batch 1): dense {d['dense_tokens_per_s']:.1f} tokens/s, "
                          f"compiled {d['compiled_tokens_per_s']:.1f} tokens/s (step p50 {d['compiled_p50_ms']:.2f} ms), "
                          f"speedup {speedup_text(d)}, same tokens as dense: {d['same_tokens_as_dense']}")


QUALITY_COLOURS = {"good": "green", "degraded": "yellow", "poor": "red"}


def echo_quality(report: dict) -> None:
    """The quality verdict line (compiled vs dense agreement, compiler/report.py thresholds), coloured;
    nothing when nothing was measured."""
    from compiler.report import quality_line, quality_verdict

    q = quality_verdict(report)
    if q:
        click.secho(quality_line(q), fg=QUALITY_COLOURS[q["verdict"]], bold=q["verdict"] != "good")


@click.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", "backends", help="Comma-separated backends (default: those verified before, else onnxruntime).")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option("--seqlen", type=int, default=128, show_default=True)
@click.option("--runs", type=int, default=10, show_default=True, help="Timed runs per configuration and point.")
@click.option("--max-accuracy-drop", type=float, default=0.05, show_default=True,
              help="Accuracy gate (1 - cosine vs dense) a configuration must meet to be named fastest.")
@click.option("--out", "out", type=click.Path(path_type=Path), help="JSON output (default: ARTIFACT/bench.json).")
@click.option("--decode", is_flag=True, help="Causal LMs: greedy decode tokens/s (batch 1, --seqlen prompt tokens) "
              "against the measured memory bandwidth, per thread count.")
@click.option("--tokens", type=int, default=128, show_default=True, help="--decode: tokens generated.")
def bench_cmd(artifact, backends, batch_sizes, threads, seqlen, runs, max_accuracy_drop, out, decode, tokens):
    """Sweep backends x batch sizes x threads; print a table and name the fastest configuration."""
    from compiler.artifact import Artifact, write_json
    from runtimes.measure.bench import bench_artifact, parse_positive_list

    sizes = parse_positive_list(batch_sizes, "--batch-sizes")
    thread_counts = parse_positive_list(threads, "--threads")
    if seqlen <= 0 or runs <= 0:
        raise SparsecError(f"--seqlen and --runs must be > 0, got {seqlen} and {runs}")
    art = Artifact.load(artifact)
    names = _backends(backends, art)
    if decode:
        from runtimes.measure.decode_bench import run_decode_bench

        return run_decode_bench(art, names, registry_with(names), thread_counts, seqlen, tokens, out)
    result = bench_artifact(art.root, art.manifest, names, registry_with(names), sizes, thread_counts,
                            {"seqlen": seqlen, "runs": runs}, max_accuracy_drop)
    if out is None:
        art.update(files={"bench.json": result})
        out = art.root / "bench.json"
    else:
        write_json(Path(out), result)
    _print_bench(result, out)


def _print_bench(result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("backend", "config", "batch", "threads", "p50 ms", "p90 ms", "ms/seq", "decode p50 ms", "cosine", "gate")
    for r in result["rows"]:
        table.add_row(r["backend"], r["config"], str(r["batch_size"]), str(r["threads"]), f"{r['p50_ms']:.2f}",
                      f"{r['p90_ms']:.2f}", f"{r['ms_per_sequence']:.2f}",
                      f"{r['decode']['p50_ms']:.2f}" if "decode" in r else "",
                      "" if r["cosine"] is None else f"{r['cosine']:.4f}", "ok" if r["meets_accuracy"] else "no")
    console = Console()
    console.print(table)
    f = result["fastest"]
    if f:
        console.print(f"fastest meeting the accuracy gate (1 - cosine <= {result['max_accuracy_drop']}): "
                      f"{f['backend']} / {f['config']}, batch {f['batch_size']}, {f['threads']} threads: "
                      f"{f['ms_per_sequence']:.2f} ms per sequence (p50 {f['p50_ms']:.2f} ms)")
    else:
        console.print("no configuration meets the accuracy gate")
    console.print(f"wrote {out}")
