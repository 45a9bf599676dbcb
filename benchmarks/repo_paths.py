"""Where the benchmarks read and write, and how they record paths in their results.

Results are committed, so a path inside the repository is written relative to its root (the same
on every clone); a path outside it is written as given.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository root when it lies inside it, else unchanged."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)
