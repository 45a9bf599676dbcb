"""The sweep's table: one row per (cell, backend), written as results.csv and results.md, and the
best configuration within a quality budget.

"Best" = the highest measured speedup vs dense (same backend, paired rounds: the median of per-round
ratios) among the rows whose quality drop is within the budget; ties go to the smaller drop. The
speedup verdict (`faster` only when the whole 95 % interval is above 1) travels with it, so a "best"
that is not measurably faster than dense says so.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    key: str
    method: str
    allocation: str
    sparsity: float
    status: str
    backend: str = ""
    measured_sparsity: float | None = None
    quality_metric: str = ""
    quality: float | None = None  # compiled model's held-out metric (perplexity or mean cosine)
    quality_drop: float | None = None  # perplexity ratio - 1, or 1 - cosine
    dense_p50_ms: float | None = None
    compiled_p50_ms: float | None = None
    speedup: float | None = None
    speedup_low: float | None = None
    speedup_high: float | None = None
    verdict: str = ""
    pareto: bool = False
    artifact: str = ""
    error: str = ""


def rows_from_results(results: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for r in sorted(results, key=lambda x: (x["cell"]["method"], x["cell"]["allocation"], x["cell"]["sparsity"])):
        head = {"key": r["key"], "method": r["cell"]["method"], "allocation": r["cell"]["allocation"],
                "sparsity": r["cell"]["sparsity"], "status": r["status"]}
        if r["status"] != "ok":
            rows.append(Row(**head, error=r.get("error", "")))
            continue
        q = r["quality"]
        for backend, b in r["backends"].items():
            rows.append(Row(**head, backend=backend, measured_sparsity=r.get("measured_sparsity"), quality_metric=q["metric"],
                            quality=q["compiled"], quality_drop=q["drop"], dense_p50_ms=b.get("dense_p50_ms"),
                            compiled_p50_ms=b.get("compiled_p50_ms"), speedup=b.get("speedup"), speedup_low=b.get("speedup_low"),
                            speedup_high=b.get("speedup_high"), verdict=b.get("verdict") or "", artifact=r["artifact"]))
    return rows


def best_within(rows: list[Row], max_drop: float) -> Row | None:
    ok = [(r.speedup, -r.quality_drop, i) for i, r in enumerate(rows)
          if r.status == "ok" and r.speedup is not None and r.quality_drop is not None and r.quality_drop <= max_drop]
    return rows[max(ok)[2]] if ok else None


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def speedup_cell(r: Row) -> str:
    if r.speedup is None:
        return ""
    interval = f" [{r.speedup_low:.2f}, {r.speedup_high:.2f}]" if r.speedup_low is not None and r.speedup_low == r.speedup_low else ""
    return f"{r.speedup:.2f}x{interval} {r.verdict}".strip()


SHORT = {"embedding_cosine": "cos", "perplexity": "ppl", "output_cosine": "cos"}


def to_markdown(rows: list[Row]) -> str:
    """The table for humans (p50 = median latency; "front" marks the Pareto front per backend)."""
    head = ["cell", "backend", "sparsity", "quality", "drop", "dense p50 ms", "compiled p50 ms", "speedup [95% CI] verdict", "front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 6 + [":---:"]) + "|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.key} | failed: {r.error.replace('|', '/')[:120]} |" + " |" * (len(head) - 2))
            continue
        quality = f"{SHORT.get(r.quality_metric, r.quality_metric)} {r.quality:.4g}" if r.quality is not None else ""
        lines.append("| " + " | ".join([r.key, r.backend, _num(r.measured_sparsity, ".3f"), quality, _num(r.quality_drop, ".4f"),
                                        _num(r.dense_p50_ms, ".2f"), _num(r.compiled_p50_ms, ".2f"), speedup_cell(r),
                                        "*" if r.pareto else ""]) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[Row], sweep_dir: Path) -> tuple[Path, Path]:
    from compiler.sweep.store import write_text_atomic

    csv_path, md_path = Path(sweep_dir) / "results.csv", Path(sweep_dir) / "results.md"
    write_text_atomic(csv_path, to_csv(rows))
    write_text_atomic(md_path, to_markdown(rows))
    return csv_path, md_path
