"""`run_sweep`: skip the finished cells, run the rest on Ray, then write the table and the plot.

Separate from the click command so a script (or a test) runs a sweep with the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compiler.sweep.grid import Cell, SweepGrid
from compiler.sweep.pareto import mark_front, plot_front
from compiler.sweep.runner import RayOptions, run_cells
from compiler.sweep.store import GRID, finished, prepare_sweep_dir, write_json_atomic
from compiler.sweep.table import Row, best_within, rows_from_results, write_tables


@dataclass
class SweepOutcome:
    rows: list[Row]
    executed: int  # cells run this time
    skipped: int  # cells finished by an earlier run (same settings)
    failed: list[str] = field(default_factory=list)  # keys of cells that failed this time
    csv: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None
    best: Row | None = None


def run_sweep(grid: SweepGrid, sweep_dir: Path, ray_options: RayOptions, max_drop: float | None = None,
              echo: Callable[[str], None] = print) -> SweepOutcome:
    sweep_dir = Path(sweep_dir)
    prepare_sweep_dir(sweep_dir)
    write_json_atomic(sweep_dir / GRID, grid.to_dict())
    done = finished(sweep_dir, grid)
    todo = [c for c in grid.cells if c.key not in done]
    echo(f"sweep: {len(grid.cells)} cells ({len(grid.sparsities)} sparsities x {len(grid.methods)} methods x "
         f"{len(grid.allocations)} allocations), backends {','.join(grid.settings.backends)}: "
         f"{len(done)} finished before, {len(todo)} to run")
    counter = {"n": 0}

    def on_done(cell: Cell, result: dict[str, Any]) -> None:
        counter["n"] += 1
        echo(f"  [{counter['n']}/{len(todo)}] {cell.key}: {_one_line(result)}")

    new = run_cells(grid, todo, sweep_dir, ray_options, on_done)
    results = [*done.values(), *(r for r in new.values() if r.get("status") == "ok")]
    failures = [r for r in new.values() if r.get("status") != "ok"]
    rows = mark_front(rows_from_results([*results, *failures]))
    csv_path, md_path = write_tables(rows, sweep_dir)
    plot = plot_front(rows, sweep_dir / "pareto.png", max_drop)
    best = best_within(rows, max_drop) if max_drop is not None else None
    return SweepOutcome(rows, len(todo), len(done), [r["key"] for r in failures], csv_path, md_path, plot, best)


def _one_line(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"FAILED: {result.get('error')}"
    q = result["quality"]
    speeds = ", ".join(f"{name} {b['speedup']:.2f}x {b.get('verdict') or ''}".rstrip() for name, b in result["backends"].items())
    return f"{q['metric']} {q['compiled']:.4g} (drop {q['drop']:.4f}), {speeds}, {result['cell_seconds']:.0f}s"
