"""`sparsec bench`: sweep backends × batch sizes × thread counts over the compiled model and its dense
alternatives (dense fp32, dense int8 forms), and name the fastest configuration that meets the
accuracy gate.

Every (backend, batch size, threads) point times all its configurations interleaved (as
verification does). Accuracy (vs dense fp32 on the same backend) does not depend on batch size or
threads, so it is measured once per backend, at the first point. "Fastest" means the lowest time per
sequence (p50 / batch size): the throughput view; the lowest batch-1 latency is reported too.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from compiler.errors import SparsecError
from runtimes.measure.dense import COMPILED, DENSE, dense_reference, model_configs
from runtimes.measure.inputs import VerifyOptions, build_inputs
from runtimes.measure.machine import load_average, record_machine
from runtimes.measure.speedup import speedup
from runtimes.measure.verify import measure_backend


def parse_positive_list(text: str, what: str) -> tuple[int, ...]:
    """"1,8" → (1, 8); every value must be an integer > 0 (one-line error otherwise)."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise SparsecError(f"{what} must be comma-separated integers, got '{text}'") from None
        if value <= 0:
            raise SparsecError(f"{what} must be > 0, got {value}")
        values.append(value)
    if not values:
        raise SparsecError(f"{what}: no value given")
    return tuple(dict.fromkeys(values))


def bench_artifact(root: Path, manifest: dict[str, Any], backends: tuple[str, ...], registry: Any,
                   batch_sizes: tuple[int, ...], threads: tuple[int, ...], options: dict[str, Any] | None = None,
                   max_accuracy_drop: float = 0.05) -> dict[str, Any]:
    from runtimes.registry_helpers import check_backends_available

    base = VerifyOptions.from_dict(options)
    lowering = manifest.get("lowering")
    if not lowering:
        raise SparsecError(f"artifact '{root}' has no lowered model: run `sparsec lower {root} --backend B` (or compile with --backend)")
    check_backends_available(registry, backends)
    dense_root = dense_reference(manifest, options, backends, registry)
    rows: list[dict[str, Any]] = []
    machine = record_machine(threads=None)
    accuracy: dict[tuple[str, str], dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="sparsec-bench-"))
    try:
        for name in backends:
            backend = registry.get_backend(name)()
            configs = model_configs(root, manifest, backend, dense_root, backends, registry)
            for bs in batch_sizes:
                for th in threads:
                    opts = replace(base, batch_size=bs, threads=th,
                                   accuracy_batches=base.accuracy_batches if (name, COMPILED) not in accuracy else 1)
                    inputs = build_inputs(root, lowering, opts)
                    measured = measure_backend(backend, configs, lowering, inputs, opts, work / f"{name}-{bs}-{th}")
                    dense_rounds = measured["configs"][DENSE]["prefill"]
                    for label, c in measured["configs"].items():
                        if "accuracy" in c and (name, label) not in accuracy:
                            accuracy[(name, label)] = c["accuracy"]
                        vs_dense = speedup(dense_rounds["rounds_ms"], c["prefill"]["rounds_ms"], load=load_average(),
                                           contention=(measured.get("timing") or {}).get("contention"))
                        rows.append({"backend": name, "config": label, "batch_size": bs, "threads": th,
                                     "seqlen": inputs.seqlen, **c["prefill"], "speedup_vs_dense": vs_dense.to_dict(),
                                     "timing": measured.get("timing"),
                                     **({"decode": c["decode"]} if "decode" in c else {}),
                                     "precision": c["details"].get("precision"),
                                     "sparse_kernels": c["details"].get("sparse_kernels")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        acc = accuracy.get((row["backend"], row["config"]))
        row["cosine"] = 1.0 if row["config"] == DENSE else (acc or {}).get("cosine")
        row["accuracy_drop"] = None if row["cosine"] is None else 1.0 - row["cosine"]
        row["meets_accuracy"] = row["accuracy_drop"] is not None and row["accuracy_drop"] <= max_accuracy_drop
        row["ms_per_sequence"] = row["p50_ms"] / row["batch_size"]
    ok = [r for r in rows if r["meets_accuracy"]]
    fastest = min(ok, key=lambda r: r["ms_per_sequence"]) if ok else None
    batch1 = [r for r in ok if r["batch_size"] == 1]
    return {"rows": rows, "max_accuracy_drop": max_accuracy_drop, "fastest": fastest, "machine": machine.finish().to_dict(),
            "lowest_latency_batch1": min(batch1, key=lambda r: r["p50_ms"]) if batch1 else None,
            "runs": base.runs, "seqlen": rows[0]["seqlen"] if rows else base.seqlen}
