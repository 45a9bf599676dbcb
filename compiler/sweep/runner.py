"""Run a sweep's unfinished cells as Ray tasks: a local Ray instance by default (as many CPUs as this
machine has), or an existing cluster with `address` ("auto", "ray://host:10001", ...).

Each task asks Ray for `cpus_per_task` CPUs (1 by default), so Ray runs as many cells at once as the
CPUs allow and queues the rest. Results come back as tasks finish; each task has already written its
cell's JSON (store.py), and the driver writes it again when missing (a cluster whose workers do not
share SWEEP_DIR's filesystem). On a cluster, every node needs sparsec installed and the model (and
SWEEP_DIR, to keep the artifacts) reachable at the same path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from compiler.errors import SparsecError
from compiler.sweep.grid import Cell, SweepGrid
from compiler.sweep.store import RESULT, cell_dir
from compiler.sweep.tasks import run_cell, write_cell_result

LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024  # results are small JSON dicts: keep Ray's shared memory small


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local instance
    cpus_per_task: float = 1.0
    num_cpus: int | None = None  # local instance only; default: this machine's CPUs

    def __post_init__(self) -> None:
        if not self.cpus_per_task > 0:
            raise SparsecError(f"--cpus-per-task must be > 0, got {self.cpus_per_task}")


def start_ray(options: RayOptions) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (and so must shut it down).
    A Ray already initialised in this process (a test, a notebook) is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if options.address:
            ray.init(address=options.address, **common)
        else:
            ray.init(num_cpus=options.num_cpus or os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local instance"
        raise SparsecError(f"cannot start Ray ({where}): {' '.join(str(exc).split())[:300]}") from None
    return True


def run_cells(grid: SweepGrid, cells: list[Cell], sweep_dir: Path, options: RayOptions,
              on_done: Callable[[Cell, dict[str, Any]], None] = lambda c, r: None) -> dict[str, dict[str, Any]]:
    """Run `cells` as Ray tasks; {key: result or error record}. Ctrl-C cancels what is still running
    (finished cells stay written) and re-raises KeyboardInterrupt."""
    import ray

    if not cells:
        return {}
    started_here = start_ray(options)
    task = ray.remote(num_cpus=options.cpus_per_task, max_retries=0)(run_cell)
    settings, where = grid.settings.to_dict(), str(Path(sweep_dir).resolve())
    pending = {task.remote({"sparsity": c.sparsity, "method": c.method, "allocation": c.allocation}, settings, where): c
               for c in cells}
    results: dict[str, dict[str, Any]] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died (OOM kill, node lost): a failed cell
                    result = {"key": cell.key, "cell": cell.shorthand(), "settings_digest": grid.settings.digest,
                              "status": "failed", "error": f"Ray task failed: {' '.join(str(exc).split())[:500]}", "exit_code": 1}
                    write_cell_result(Path(sweep_dir), cell, result)
                if result.get("status") == "ok" and not (cell_dir(Path(sweep_dir), cell) / RESULT).exists():
                    write_cell_result(Path(sweep_dir), cell, result)
                results[cell.key] = result
                on_done(cell, result)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
    return results
