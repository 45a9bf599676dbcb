"""`sparsec sweep`: a thin click shell over compiler.sweep (grid of compile + evaluation + verification
as Ray tasks, resumable; results.csv, results.md, pareto.png). See docs/sweep.md.

Exit codes: 0 ok; 2 a bad grid value (checked before Ray starts); 3 a backend is not available here;
1 a cell failed (the others are kept; rerun to retry it), or no configuration is within
--max-accuracy-drop; 130 interrupted (finished cells are kept).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


@click.command("sweep")
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Sweep directory (created, or reused: finished cells are skipped).")
@click.option("--sparsity", default="0.5", show_default=True, help="Comma-separated target sparsities, e.g. 0.5,0.6,0.7.")
@click.option("--method", default="wanda", show_default=True, help="Comma-separated pruning methods: magnitude,wanda,sparsegpt.")
@click.option("--allocation", default="uniform", show_default=True, help="Comma-separated allocations: uniform,owl,alphapruning,auto.")
@click.option("--backend", "backends", default="onnxruntime", show_default=True, help="Comma-separated backends to verify speed on.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int8-dynamic", "int4", "int8-weight", "bf16"]), help="Quantization for every cell.")
@click.option("--recover", help="Recovery passes for every cell (as compile --recover).")
@click.option("--pattern", help="unstructured | N:M for every cell (as compile --pattern).")
@click.option("--max-accuracy-drop", type=float, help="Print the fastest configuration whose held-out quality drop "
              "(perplexity ratio - 1 for LMs, 1 - cosine for encoders) is within this.")
@click.option("--address", help="Ray cluster address (e.g. auto, ray://head:10001); default: a local Ray instance.")
@click.option("--cpus-per-task", type=float, default=1.0, show_default=True, help="CPUs Ray reserves per cell.")
@click.option("--calib", default="default", show_default=True, help="Calibration data (as compile --calib).")
@click.option("--calib-samples", type=int, default=32, show_default=True)
@click.option("--calib-seqlen", type=int, default=128, show_default=True)
@click.option("--eval-data", default="eval", show_default=True, help="Held-out text for the quality metric ('eval' = built-in).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Verification batch size.")
@click.option("--seqlen", type=int, default=128, show_default=True, help="Verification sequence length.")
@click.option("--threads", type=int, help="Inference threads per cell (default: --cpus-per-task, at least 1).")
@click.option("--runs", type=int, default=20, show_default=True, help="Paired timing rounds per cell (at least).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plugin", "plugins", multiple=True, help="Plugin file or module (repeatable).")
def sweep_cmd(model, out, sparsity, method, allocation, backends, quantize, recover, pattern, max_accuracy_drop, address,
              cpus_per_task, calib, calib_samples, calib_seqlen, eval_data, batch_size, seqlen, threads, runs, seed, plugins):
    """Compile, evaluate and verify MODEL over a grid of sparsity x method x allocation, as Ray tasks."""
    import math

    from compiler.errors import SparsecError
    from compiler.sweep.grid import SweepArgumentError, SweepSettings, build_grid, split_list

    if max_accuracy_drop is not None and not max_accuracy_drop > 0:
        raise SweepArgumentError(f"--max-accuracy-drop must be > 0, got {max_accuracy_drop}")
    if not cpus_per_task > 0:
        raise SweepArgumentError(f"--cpus-per-task must be > 0, got {cpus_per_task}")
    names = split_list(backends, "--backend")
    settings = SweepSettings(model=model, backends=names, quantize=quantize, recover=recover, pattern=pattern, calib=calib,
                             calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, eval_data=eval_data,
                             batch_size=batch_size, seqlen=seqlen, threads=threads or max(1, math.ceil(cpus_per_task)),
                             runs=runs, plugins=tuple(plugins))
    grid = build_grid(settings, sparsity, method, allocation)
    _check_backends(names, tuple(plugins))
    from compiler.sweep.run import run_sweep
    from compiler.sweep.runner import RayOptions

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        outcome = run_sweep(grid, out, RayOptions(address=address, cpus_per_task=cpus_per_task), max_accuracy_drop, click.echo)
    except KeyboardInterrupt:
        click.secho(f"interrupted: finished cells are kept in {out}/cells; rerun the same command to resume", fg="red", err=True)
        sys.exit(130)
    from rich.console import Console
    from rich.markdown import Markdown

    from compiler.sweep.table import speedup_cell, to_markdown

    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(Markdown(to_markdown(outcome.rows)))
    click.echo(f"ran {outcome.executed} cells, {outcome.skipped} finished before; wrote {outcome.csv}, {outcome.markdown}"
               + (f", {outcome.plot}" if outcome.plot else " (no plot: matplotlib missing or nothing measured)"))
    if outcome.failed:
        raise SparsecError(f"{len(outcome.failed)} cells failed ({', '.join(outcome.failed)}): see {out}/cells/<key>/error.json; "
                           "rerun the same command to retry them")
    if max_accuracy_drop is not None:
        b = outcome.best
        if b is None:
            raise SparsecError(f"no configuration within --max-accuracy-drop {max_accuracy_drop} (see {outcome.markdown})")
        note = "" if b.verdict == "faster" else " (not measurably faster than dense: see the interval)"
        click.echo(f"best within --max-accuracy-drop {max_accuracy_drop}: {b.key} on {b.backend}: speedup {speedup_cell(b)}, "
                   f"{b.quality_metric} {b.quality:.4g} (drop {b.quality_drop:.4f}), artifact {out}/{b.artifact}{note}")


def _check_backends(names: tuple[str, ...], plugins: tuple[str, ...]) -> None:
    """Unknown or unavailable backends fail here (exit 3), before Ray starts."""
    from compiler.registry import Registry
    from compiler.sweep.grid import SweepArgumentError
    from runtimes.registry_helpers import check_backends_available

    registry = Registry.default(plugins)
    unknown = [n for n in names if n not in registry.backends]
    if unknown:
        raise SweepArgumentError(f"--backend: unknown backend '{unknown[0]}' (known: {', '.join(sorted(registry.backends))})")
    check_backends_available(registry, names)
