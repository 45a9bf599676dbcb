"""One cell of a sweep: compile + held-out evaluation + verification on every backend, by calling
`compile_model` in-process (the same function `sparsec compile` runs; no CLI subprocess), then
summarise the artifact's report into the cell's result.json.

`run_cell` is what a Ray task executes (compiler/sweep/runner.py), but it is a plain function: it
takes and returns JSON-able dicts, so it can also run without Ray. Errors never escape: a failed
cell returns (and writes) an error record, and the rest of the grid goes on.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from compiler.errors import SparsecError
from compiler.sweep.grid import Cell, SweepSettings
from compiler.sweep.store import ERROR, RESULT, cell_dir, write_json_atomic

ARTIFACT = "artifact"


def quality_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The held-out quality of a compiled model and its drop vs dense, defined as `--max-accuracy-drop`
    defines it for compile (perplexity ratio − 1 for causal LMs, 1 − cosine otherwise)."""
    from compiler.accuracy_budget import quality_drop

    out = {"metric": evaluation["metric"], "dense": evaluation.get("dense"), "compiled": evaluation["compiled"],
           "drop": round(quality_drop(evaluation), 6),
           "drop_definition": "perplexity ratio - 1" if evaluation["metric"] == "perplexity" else "1 - cosine"}
    for key in ("ratio", "top1_agreement", "min", "samples", "tokens"):
        if key in evaluation:
            out[key] = evaluation[key]
    return out


def backend_summary(b: dict[str, Any]) -> dict[str, Any]:
    """The paired speed measurement of one backend (median of per-round ratios and its 95 % interval)."""
    iv = b.get("speedup_interval") or {}
    return {"dense_p50_ms": b.get("dense_p50_ms"), "compiled_p50_ms": b.get("compiled_p50_ms"),
            "speedup": b.get("speedup_vs_dense"), "speedup_low": iv.get("low"), "speedup_high": iv.get("high"),
            "verdict": iv.get("verdict"), "speedup_vs_fastest_dense": b.get("speedup_vs_fastest_dense"),
            "cosine": b.get("cosine"), "precision": b.get("precision"), "sparse_kernels": b.get("sparse_kernels"),
            "threads": b.get("threads"), "runs": b.get("runs")}


def summarize(cell: Cell, settings: SweepSettings, report: dict[str, Any], artifact: str, seconds: float) -> dict[str, Any]:
    return {"key": cell.key, "cell": cell.shorthand(), "settings_digest": settings.digest, "status": "ok",
            "artifact": artifact, "measured_sparsity": report.get("sparsity", {}).get("overall_measured"),
            "quality": quality_summary(report["evaluation"]),
            "backends": {name: backend_summary(b) for name, b in report.get("backends", {}).items()},
            "compile_seconds": report.get("compile_seconds"), "cell_seconds": round(seconds, 2),
            "host": socket.gethostname(), "pid": os.getpid(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_cell(cell_data: dict[str, Any], settings_data: dict[str, Any], sweep_dir: str) -> dict[str, Any]:
    """Compile, evaluate and verify one cell into SWEEP_DIR/cells/<key>/; returns its result or error record."""
    cell, settings = Cell(**cell_data), SweepSettings.from_dict(settings_data)
    directory = cell_dir(Path(sweep_dir), cell)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        _limit_threads(settings.threads)
        report = _compile(cell, settings, directory / ARTIFACT)
        result = summarize(cell, settings, report, f"cells/{cell.key}/{ARTIFACT}", time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the grid; the record says why
        result = {"key": cell.key, "cell": cell.shorthand(), "settings_digest": settings.digest, "status": "failed",
                  "error": exc.one_line() if isinstance(exc, SparsecError) else f"{type(exc).__name__}: {exc}",
                  "exit_code": getattr(exc, "exit_code", 1), "traceback": traceback.format_exc(limit=20),
                  "cell_seconds": round(time.perf_counter() - started, 2), "host": socket.gethostname()}
    write_cell_result(Path(sweep_dir), cell, result)
    return result


def write_cell_result(sweep_dir: Path, cell: Cell, result: dict[str, Any]) -> None:
    """result.json for a finished cell (error.json removed), error.json for a failed one (stale result removed)."""
    directory = cell_dir(sweep_dir, cell)
    keep, drop = (RESULT, ERROR) if result.get("status") == "ok" else (ERROR, RESULT)
    write_json_atomic(directory / keep, result)
    (directory / drop).unlink(missing_ok=True)


def _compile(cell: Cell, settings: SweepSettings, out: Path) -> dict[str, Any]:
    from compiler.calibration import CalibrationConfig
    from compiler.compile import CompileOptions, compile_model

    opts = CompileOptions(
        model=settings.model, out=out, plugins=settings.plugins, force=True, seed=settings.seed,
        calib=CalibrationConfig(source=settings.calib, samples=settings.calib_samples, seqlen=settings.calib_seqlen,
                                seed=settings.seed),
        backends=settings.backends, eval_data=settings.eval_data, verify=settings.verify_options(),
        shorthand={**cell.shorthand(), "pattern": settings.pattern, "quantize": settings.quantize, "recover": settings.recover},
    )
    return compile_model(opts).report


def _limit_threads(threads: int) -> None:
    """A task gets `--cpus-per-task` CPUs: keep torch's pool to that (Ray worker processes are reused)."""
    import torch

    torch.set_num_threads(max(1, threads))
