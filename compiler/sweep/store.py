"""Where a sweep keeps its results: SWEEP_DIR/cells/<key>/{result.json | error.json, artifact/}.

A cell is finished when its result.json exists and was computed with the same shared settings
(`settings_digest`); every JSON file is written to a temporary name and renamed, so a crash or a
Ctrl-C leaves either the whole file or none. A failed cell writes error.json instead and is retried
on the next run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from compiler.errors import ArtifactError
from compiler.sweep.grid import Cell, SweepGrid

RESULT = "result.json"
ERROR = "error.json"
GRID = "sweep.json"


def cell_dir(sweep_dir: Path, cell: Cell) -> Path:
    return Path(sweep_dir) / "cells" / cell.key


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_sweep_dir(sweep_dir: Path) -> None:
    """Create SWEEP_DIR (or reuse it: that is how a sweep resumes) and prove it is writable, before any work."""
    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ArtifactError(f"-o {sweep_dir}: exists and is not a directory")
    try:
        (sweep_dir / "cells").mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=sweep_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ArtifactError(f"-o {sweep_dir}: cannot write there ({exc.strerror or exc})") from None


def finished(sweep_dir: Path, grid: SweepGrid) -> dict[str, dict[str, Any]]:
    """{cell key: result} for the cells already computed with this grid's shared settings."""
    done = {}
    for cell in grid.cells:
        result = read_json(cell_dir(sweep_dir, cell) / RESULT)
        if result and result.get("settings_digest") == grid.settings.digest:
            done[cell.key] = result
    return done


def failed(sweep_dir: Path, grid: SweepGrid) -> dict[str, dict[str, Any]]:
    """{cell key: error record} for cells whose last attempt failed (and that have no result)."""
    out = {}
    for cell in grid.cells:
        d = cell_dir(sweep_dir, cell)
        err = read_json(d / ERROR)
        if err and not (d / RESULT).exists():
            out[cell.key] = err
    return out
