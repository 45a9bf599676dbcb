"""The quality-vs-speed front of a sweep, per backend, and its plot.

A row is on the front when no other row of the same backend is at least as fast (measured speedup vs
dense, median of paired rounds) and at least as good (quality drop vs dense) and strictly better in
one of the two. The plot (matplotlib, optional: without it the table still has the `pareto` column)
shows every cell with its 95 % speedup interval, the front as a line, 1x (dense speed) and the budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compiler.sweep.table import Row


def measured(rows: list[Row]) -> list[tuple[Row, float, float]]:
    """(row, speedup, quality drop) for the rows that have both."""
    return [(r, r.speedup, r.quality_drop) for r in rows if r.status == "ok" and r.speedup is not None and r.quality_drop is not None]


def mark_front(rows: list[Row]) -> list[Row]:
    """The rows with `pareto` set for the non-dominated ones (per backend)."""
    points = measured(rows)

    def dominated(r: Row, speed: float, drop: float) -> bool:
        return any(o is not r and o.backend == r.backend and s >= speed and d <= drop and (s > speed or d < drop)
                   for o, s, d in points)

    front = {id(r) for r, s, d in points if not dominated(r, s, d)}
    return [dataclasses.replace(r, pareto=id(r) in front) for r in rows]


def _half_widths(r: Row, speed: float) -> tuple[float, float]:
    """The 95 % interval as error-bar half widths (0 where the interval is missing or NaN)."""
    low, high = r.speedup_low, r.speedup_high
    ok = low is not None and high is not None and low == low and high == high
    return (speed - low, high - speed) if ok else (0.0, 0.0)  # type: ignore[operator]


def plot_front(rows: list[Row], path: Path, max_drop: float | None = None) -> Path | None:
    """Write the plot to `path`; None when matplotlib is not installed or nothing was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = measured(rows)
    if not points:
        return None
    backends = sorted({r.backend for r, _, _ in points})
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        pts = [p for p in points if p[0].backend == backend]
        for method in sorted({r.method for r, _, _ in pts}):
            sub = [p for p in pts if p[0].method == method]
            widths = [_half_widths(r, s) for r, s, _ in sub]
            ax.errorbar([s for _, s, _ in sub], [d for _, _, d in sub], xerr=[[w[0] for w in widths], [w[1] for w in widths]],
                        fmt="o", capsize=3, label=method)
        for r, s, d in pts:
            ax.annotate(f"{r.allocation} {100 * r.sparsity:g}%", (s, d), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = sorted(((s, d) for r, s, d in pts if r.pareto))
        if front:
            ax.plot([s for s, _ in front], [d for _, d in front], "k--", lw=1, label="Pareto front")
        ax.axvline(1.0, color="grey", lw=0.8)
        if max_drop is not None:
            ax.axhline(max_drop, color="red", lw=0.8, ls=":", label=f"max drop {max_drop:g}")
        ax.set_xlabel("measured speedup vs dense (same backend; 95% interval)")
        ax.set_ylabel(f"quality drop vs dense ({_drop_label(pts[0][0].quality_metric)})")
        ax.set_title(backend)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _drop_label(metric: str) -> str:
    return "perplexity ratio - 1" if metric == "perplexity" else "1 - cosine"
