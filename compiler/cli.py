"""The `sparsec` command line: a thin click shell over `compiler` (one function per command).

Exit codes: 0 ok, 1 compile error / bad input, 2 verification failed, 3 requested backend
unavailable, 130 interrupted; click's own usage errors exit 2 as click does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from compiler.cli_stream import max_memory_bytes, stream_options
from compiler.errors import SparsecError
from compiler.spec import DEFAULT_SPARSITY

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class SparsecGroup(click.Group):
    """Turns SparsecError into a one-line message and its exit code; no traceback for user errors."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SparsecError as exc:
            click.secho(f"error: {exc.one_line()}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted: nothing was written to the output", fg="red", err=True)
            sys.exit(130)


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@click.group(cls=SparsecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparsec")
def main() -> None:
    """sparsec: compile PyTorch / Hugging Face models into sparse models that really run faster."""
    _quiet_libraries()


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be > 0")
    return value


@main.command("compile")
@click.argument("model", default="minilm")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Artifact directory to create.")
@click.option("--recipe", type=click.Path(path_type=Path), help="YAML recipe (pipeline + calibration + backends).")
@click.option("--passes", "passes_spec", help='Pipeline spec, e.g. "outlier-analysis{m=5},prune{method=wanda}".')
@click.option("--plugin", "plugins", multiple=True, help="Plugin file or module defining passes/backends (repeatable).")
@click.option("--calib", default="default", show_default=True, help="Calibration data: default | self | FILE.txt | FILE.jsonl | DIR.")
@click.option("--tokenizer", help="Tokenizer directory or hub id, for a model directory without tokenizer files.")
@click.option("--calib-samples", type=int, default=32, show_default=True, callback=_positive)
@click.option("--calib-seqlen", type=int, default=128, show_default=True, callback=_positive, help="Tokens per sample (capped by the model).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sparsity", type=float, help=f"Target sparsity (shorthand; default {DEFAULT_SPARSITY}).")
@click.option("--allocation", help="Layerwise allocation: auto (default: best on held-out data) | uniform | owl | alphapruning (shorthand).")
@click.option("--method", help="Pruning method: magnitude | wanda | sparsegpt (shorthand).")
@click.option("--pattern", help="unstructured | N:M such as 2:4 (shorthand).")
@click.option("--quantize", type=click.Choice(["none", "int8", "int8-dynamic", "int4", "int8-weight", "bf16"]),
              help="Quantization (shorthand); int4 / int8-weight = weight-only (int4: onnxruntime/openvino; "
                   "int8-weight: onnxruntime/sparsec; bf16: sparsec).")
@click.option("--recover", help="Recovery passes after prune, comma-separated: reconstruct | prune-grow | finetune (shorthand).")
@click.option("--backend", "backends", help="Comma-separated backends to lower to and verify on, e.g. onnxruntime,openvino.")
@click.option("--eval-data", help="Held-out text to evaluate compiled vs dense (perplexity / embedding cosine); 'eval' = built-in.")
@click.option("--batch-size", type=int, default=1, show_default=True, callback=_positive)
@click.option("--seqlen", type=int, default=128, show_default=True, callback=_positive, help="Sequence length for verification.")
@click.option("--threads", type=int, default=2, show_default=True, callback=_positive)
@click.option("--runs", type=int, default=20, show_default=True, callback=_positive, help="Timed runs per model in verification.")
@click.option("--min-speedup", type=float, help="Gate: exit 2 when speedup vs dense is below this.")
@click.option("--max-accuracy-drop", type=float, help="Without --sparsity: search the highest sparsity whose held-out quality "
              "drop (perplexity ratio - 1 for LMs, 1 - cosine for encoders) stays within this. With --sparsity: "
              "a backend gate, exit 2 when 1 - cosine exceeds this.")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the IR (structure, plan, analyses) after each pass here.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@stream_options
def compile_cmd(model, out, recipe, passes_spec, plugins, calib, tokenizer, calib_samples, calib_seqlen, seed, sparsity,
                allocation, method, pattern, quantize, recover, backends, eval_data, batch_size, seqlen, threads, runs,
                min_speedup, max_accuracy_drop, dump_ir, force, stream, max_memory):
    """Compile MODEL (HF directory, hub id, module:factory, or a built-in name; default: minilm) into OUT."""
    from compiler.calibration import CalibrationConfig
    from compiler.compile import CompileOptions, compile_model

    _sigterm_as_interrupt()
    tokenizer = _checked_tokenizer(model, calib, tokenizer)
    search = max_accuracy_drop is not None and sparsity is None and not passes_spec and not recipe
    opts = CompileOptions(
        model=model, out=out, passes=passes_spec, recipe=recipe, plugins=tuple(plugins),
        calib=CalibrationConfig(source=calib, samples=calib_samples, seqlen=calib_seqlen, seed=seed),
        force=force, dump_ir=dump_ir, seed=seed, tokenizer=tokenizer,
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()) if backends else (),
        shorthand={"sparsity": sparsity, "allocation": allocation, "method": method, "pattern": pattern, "quantize": quantize,
                   "recover": recover},
        max_accuracy_drop=max_accuracy_drop if search else None,
        eval_data=eval_data, stream=stream, max_memory=max_memory_bytes(max_memory),
        verify={"batch_size": batch_size, "seqlen": seqlen, "threads": threads, "runs": runs,
                "min_speedup": min_speedup, "max_accuracy_drop": None if search else max_accuracy_drop},
    )
    if opts.backends:
        from compiler.cli_backends import echo_licence_notices

        echo_licence_notices(opts.backends, plugins)
    result = _run_with_progress(lambda progress, insts: compile_model(opts, progress=progress, instruments=insts))
    rep = result.report
    from compiler.report import headline

    click.echo(f"wrote {result.out}: {headline(rep['sparsity'])} in {rep.get('compile_seconds', 0):.1f}s")
    for note in (result.manifest.get("calibration") or {}).get("notes", []):
        if "no tokenizer" in note:
            click.secho(f"note: {note}", fg="yellow", err=True)
    if rep.get("accuracy_budget"):
        from compiler.report import budget_lines

        for line in budget_lines(rep["accuracy_budget"]):
            click.echo(f"  {line}")
    from compiler.errors import raise_for_gates
    from compiler.report import speedup_text

    for name, b in rep.get("backends", {}).items():
        click.echo(f"  {name}: dense {b.get('dense_p50_ms'):.2f} ms, compiled {b.get('compiled_p50_ms'):.2f} ms, "
                   f"speedup {speedup_text(b)}, cosine {b.get('cosine'):.4f}, passed={b.get('passed')}")
    from compiler.cli_runtime import echo_quality

    echo_quality(rep)
    raise_for_gates(rep.get("backends", {}), f"see {result.out}/report.md")


def _checked_tokenizer(model: str, calib: str, tokenizer: str | None) -> str | None:
    """Before any work: `--tokenizer` loads and tokenizes, and text calibration has a tokenizer to use.
    A tokenizer directory is recorded by absolute path (the dense reference is rebuilt from the manifest)."""
    from compiler.calibration import check_text_calibration

    check_text_calibration(model, calib, tokenizer)
    if not tokenizer:
        return None
    from compiler.trace import load_tokenizer

    load_tokenizer(tokenizer)
    return str(Path(tokenizer).resolve()) if Path(tokenizer).is_dir() else tokenizer


PROGRESS_AFTER_ENV = "SPARSEC_PROGRESS_AFTER"  # seconds into the passes before progress lines start (default 10)


def _run_with_progress(fn):
    """Run fn(progress, instruments) with a rich progress bar when stderr is a terminal, else with plain
    progress lines on stderr (pass, block i/n, elapsed seconds) once the passes have run for 10 s."""
    if sys.stderr.isatty():
        from compiler.instruments import RichProgressInstrument

        with RichProgressInstrument() as bar:
            return fn(None, [bar])
    from compiler.instruments import LogProgressInstrument

    try:
        quiet = float(os.environ.get(PROGRESS_AFTER_ENV, "10"))
    except ValueError:
        raise SparsecError(f"{PROGRESS_AFTER_ENV} must be a number of seconds, got '{os.environ[PROGRESS_AFTER_ENV]}'") from None
    return fn(None, [LogProgressInstrument(sys.stderr, quiet_for=quiet)])


@main.command("passes")
@click.argument("name", required=False)
@click.option("--plugin", "plugins", multiple=True, help="Also load this plugin.")
def passes_cmd(name, plugins):
    """List registered passes, or show one pass's options (types and defaults)."""
    from rich.console import Console
    from rich.table import Table

    from compiler.registry import Registry

    reg = Registry.default(plugins)
    console = Console()
    if name:
        cls = reg.get_pass(name)
        console.print(f"[bold]{cls.name}[/bold]: {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}")
        console.print(f"origin: {reg.passes[name].origin}")
        table = Table("option", "type", "default", "help")
        for opt in cls.options():
            table.add_row(opt.name, opt.type_name, repr(opt.default), opt.help)
        console.print(table)
        return
    table = Table("pass", "description", "origin")
    for pname, entry in sorted(reg.passes.items()):
        doc = entry.obj.description or (entry.obj.__doc__ or "").strip().splitlines()[0]
        table.add_row(pname, doc, entry.origin)
    console.print(table)


@main.group("backends", invoke_without_command=True, cls=SparsecGroup)
@click.option("--check", "check", metavar="NAME", help="Exit 0 when backend NAME is available here, else 3 with the reason.")
@click.pass_context
def backends_cmd(ctx, check):
    """List backends, whether each is available here, and how to install it."""
    if ctx.invoked_subcommand:
        return
    from rich.console import Console
    from rich.table import Table

    from compiler.registry import Registry

    reg = Registry.default()
    if check:
        entry = reg.backends.get(check)
        if entry is None:
            raise click.BadParameter(f"unknown backend '{check}' (known: {', '.join(sorted(reg.backends))})", param_hint="--check")
        info = entry.obj().info()
        click.echo(f"{check}: {'available' if info['available'] else 'unavailable'}: {info['reason']}")
        if not info["available"]:
            ctx.exit(3)
        return
    table = Table("backend", "device", "available", "reason / how to install")
    for name, entry in sorted(reg.backends.items()):
        info = entry.obj().info()
        status = "yes" if info["available"] else "no"
        detail = info["reason"] if info["available"] else f"{info['reason']} — install: {info['install']}"
        table.add_row(name, info["device"], status, detail)
    Console().print(table)


@main.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print manifest + report as JSON.")
def inspect_cmd(artifact, as_json):
    """Print an artifact's plan and report as tables (verifies its sha256 manifest first)."""
    from rich.console import Console
    from rich.table import Table

    from compiler.artifact import Artifact

    art = Artifact.load(artifact)
    report = art.report
    if as_json:
        click.echo(json.dumps({"manifest": art.manifest, "report": report}, indent=2))
        return
    console = Console()
    m = art.manifest
    console.print(f"[bold]{artifact}[/bold]  source={m['source'].get('model')}  type={m['source'].get('model_type')}")
    console.print(f"pipeline: {m['pipeline']}")
    console.print(f"calibration: {m.get('calibration')}")
    _print_plan(console, m)
    from rich import box

    passes = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    passes.add_column("pass", no_wrap=True)
    passes.add_column("seconds", justify="right", no_wrap=True)
    passes.add_column("modified", no_wrap=True)
    passes.add_column("metrics", overflow="fold")
    for p in report.get("passes", []):
        metrics = {k: v for k, v in p["metrics"].items() if not isinstance(v, (dict, list))}
        passes.add_row(p["name"], f"{p['seconds']:.2f}", str(p["modified"]),
                       ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    console.print(passes)
    _print_allocation_candidates(console, m.get("analyses", {}).get("allocation_candidates"))
    if report.get("backends"):
        from compiler.report import inconclusive_lines, speedup_text
        from runtimes.measure.machine import MachineRecord, same_machine

        bt = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        bt.add_column("backend", no_wrap=True)
        for col in ("dense p50 ms", "compiled p50 ms", "speedup [95% CI] verdict", "cosine", "max abs diff", "passed"):
            bt.add_column(col, overflow="fold")
        for name, b in report["backends"].items():
            bt.add_row(name, f"{b['dense_p50_ms']:.2f}", f"{b['compiled_p50_ms']:.2f}", speedup_text(b),
                       f"{b['cosine']:.5f}", f"{b['max_abs_diff']:.3g}", str(b["passed"]))
        console.print(bt)
        for name, b in report["backends"].items():
            if b.get("machine"):
                where = "this machine" if same_machine(b["machine"]) else "ANOTHER machine (not comparable here)"
                console.print(f"{name} measured on {where}: {MachineRecord(**b['machine']).summary()}")
        for line in inconclusive_lines(report["backends"]):
            console.print(line, markup=False)
    s = report.get("sparsity", {})
    from compiler.report import headline

    console.print(f"measured {headline(s)}")
    from compiler.cli_runtime import QUALITY_COLOURS
    from compiler.report import quality_line, quality_verdict

    q = quality_verdict(report)
    if q:
        console.print(quality_line(q), style=f"bold {QUALITY_COLOURS[q['verdict']]}", markup=False)


def _print_plan(console, m: dict) -> None:
    """The per-layer plan, readable in 80 columns: a layer inside a block is named relative to its block (the
    block's own prefix is said once, above), and a column whose value is the same for every layer (pattern,
    quant) becomes one line above the table instead."""
    from rich import box
    from rich.table import Table

    from compiler.report import relative_layer_names

    plan, ratios = m["plan"], m.get("analyses", {}).get("outlier_ratio", {})
    names, prefix = relative_layer_names(m)
    if prefix:
        console.print(f"layer names are relative to their block: block k = {prefix}", markup=False)
    pruned = [p for p in plan.values() if p["target_sparsity"] is not None] or list(plan.values())
    shared = {key: {p.get(key) or "" for p in pruned} for key in ("pattern", "quant")}
    uniform = {k: next(iter(v)) for k, v in shared.items() if len(v) == 1}
    if any(uniform.values()):
        console.print("every pruned layer: " + ", ".join(f"{k} {v}" for k, v in uniform.items() if v), markup=False)
    extra = [k for k in ("pattern", "quant") if k not in uniform]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", overflow="fold")
    for col in ("block", "params", "target", "measured", *extra):
        table.add_column(col, justify="right" if col not in extra else "left", no_wrap=True)
    if ratios:
        table.add_column("outlier %", justify="right", no_wrap=True)
    for name, p in plan.items():
        tgt = "dense" if p["target_sparsity"] is None else f"{p['target_sparsity']:.3f}"
        row = [names[name], "" if p["block"] is None else str(p["block"]), f"{p['params']:,}", tgt,
               f"{p['measured_sparsity']:.3f}", *(p.get(k) or "" for k in extra)]
        if ratios:
            r = ratios.get(name)
            row.append("" if r is None else f"{100 * r:.2f}")
        table.add_row(*row)
    console.print(table)


def _print_allocation_candidates(console, auto) -> None:
    from rich.table import Table

    from compiler.report import candidate_rows, candidates_summary

    rows = candidate_rows(auto)
    if not rows:
        return
    table = Table(title=f"method=auto: {candidates_summary(auto)}")
    table.add_column("allocation candidate", no_wrap=True)
    table.add_column("held-out score", no_wrap=True)
    table.add_column("block sparsity")
    table.add_column("", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)


# Subcommands defined in their own modules (they import only click at the top): registered last.
from compiler.cli_backends import install_cmd  # noqa: E402
from compiler.cli_eval import eval_cmd  # noqa: E402
from compiler.cli_lower import lower_cmd  # noqa: E402
from compiler.cli_runtime import bench_cmd, verify_cmd  # noqa: E402
from compiler.cli_serve import package_cmd, serve_cmd  # noqa: E402
from compiler.cli_sweep import sweep_cmd  # noqa: E402

main.add_command(eval_cmd)
main.add_command(serve_cmd)
main.add_command(package_cmd)
backends_cmd.add_command(install_cmd)
main.add_command(verify_cmd)
main.add_command(bench_cmd)
main.add_command(lower_cmd)
main.add_command(sweep_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
