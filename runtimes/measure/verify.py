"""Verification: does the compiled model run faster than the dense one, on the same backend, and
how far are its outputs from the dense model's?

`verify_backends(root, manifest, backends, registry, options) -> dict` (called by `sparsec compile
--backend` and `sparsec verify`). For every backend it builds the dense reference (the source model
lowered the same way, cached outside the artifact: `runtimes.measure.dense`) and the
compiled model, then:
- accuracy on real tokenized text (the held-out stdlib corpus): encoders — cosine of mean-pooled
  embeddings (as `sparsec eval`) and per-token cosine; causal LMs — cosine of the logits per position
  and top-1 agreement; max |Δ| over valid tokens. Always compiled vs dense fp32 on the same backend;
- latency, INTERLEAVED: every configuration is warmed up, then timed round-robin (the order rotates
  every round) for `runs` rounds, so drift of the machine hits all of them alike; p50/p90/p99.
  Causal LMs are timed in both regimes: prefill (batch × seqlen) and decode (one token after seqlen);
- dense alternatives: besides dense fp32, the dense model quantized exactly like the compiled plan,
  and the dense alternatives the backend declares (`Backend.dense_alternatives`; onnxruntime: int8-dynamic). `speedup_vs_fastest_dense`
  divides the fastest dense p50 measured on *any* verified backend by the compiled p50;
- artifact size dense vs compiled (on disk and deflate-compressed: sparsity shows up there even when
  the runtime ignores it), and whether sparse kernels ran where the runtime can tell.
Gates: `min_speedup` (vs dense fp32 on the same backend) and `max_accuracy_drop` (1 − cosine) set
`passed=False`; the CLI exits 2. A latency plot goes to `root/plots/latency.png`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import SparsecError
from compiler.lowering.files import file_sizes
from runtimes.base import Runner
from runtimes.measure.dense import COMPILED, DENSE, dense_reference, model_configs
from runtimes.measure.idle_workers import worker_pids
from runtimes.measure.inputs import InputSet, VerifyOptions, build_inputs
from runtimes.measure.machine import load_average, record_machine
from runtimes.measure.speedup import SpeedupEstimate, gate_passes, speedup
from runtimes.measure.stats import compare_outputs, merge_accuracy
from runtimes.measure.timing import cpu_clocks, paired_timing, plan_from, summary

__all__ = ["VerifyOptions", "verify_backends", "measure_backend", "apply_gates", "COMPILED", "DENSE"]


# -- one backend -----------------------------------------------------------------------------------
def measure_backend(backend: Any, configs: dict[str, Path], lowering: dict[str, Any], inputs: InputSet,
                    opts: VerifyOptions, workdir: Path) -> dict[str, Any]:
    """Build every configuration on `backend`, compare outputs with dense fp32, time them interleaved.
    Causal LMs go through the decoders (prefill + greedy decode, runtimes/measure/decode_verify.py)."""
    if lowering["task"] == "text-generation":
        from runtimes.measure.decode_verify import measure_lm_backend

        return measure_lm_backend(backend, configs, lowering, inputs, opts, workdir)
    ropts = opts.runner_options()
    runners: dict[str, Runner] = {}
    try:
        for label, path in configs.items():
            prepared = backend.prepare(path, workdir / label.replace(" ", "_"), ropts)
            runners[label] = backend.runner(prepared, ropts)
        first = lowering["outputs"][0]
        task = lowering["task"]
        accuracy: dict[str, list[dict[str, Any]]] = {label: [] for label in runners if label != DENSE}
        for feeds, valid in inputs.accuracy:
            ref = runners[DENSE].infer(feeds)[first]
            for label in accuracy:
                accuracy[label].append(compare_outputs(task, ref, runners[label].infer(feeds)[first], valid))
        series = paired_timing({label: (lambda r=r: r.infer(inputs.timing)) for label, r in runners.items()},
                               plan_from(opts), pairs=[(DENSE, COMPILED)], cpu_clocks=cpu_clocks(runners),
                               threads=opts.threads, workers=worker_pids(runners))
        result: dict[str, Any] = {
            "configs": {label: {"file": configs[label], "prefill": summary(series, label),
                                **({"accuracy": merge_accuracy(accuracy[label])} if label in accuracy else {}),
                                "details": getattr(runners[label], "details", {})} for label in runners},
            "timing": series.to_dict(),
        }
        return result
    finally:
        for r in runners.values():
            r.close()


def _sizes(path: Path, root: Path, lowering: dict[str, Any], memo: dict[Path, dict[str, int]]) -> dict[str, int]:
    """Sizes of an artifact file from its lowering section (measured once, at lowering); others
    (dense references) measured here and memoised beside the file in the cache."""
    if path not in memo:
        known = lowering.get("sizes", {}).get(_display_path(path, root))
        memo[path] = known or file_sizes(path, cache=True)
    return memo[path]


def _display_path(path: Path, root: Path) -> str:
    """Artifact files relative to the artifact (its temp dir during compile), others absolute."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def summarize(root: Path, measured: dict[str, Any], sizes: dict[str, dict[str, int]], opts: VerifyOptions,
              inputs: InputSet) -> dict[str, Any]:
    cfgs = measured["configs"]
    regime = "prefill"
    dense_p50 = cfgs[DENSE][regime]["p50_ms"]
    comp = cfgs[COMPILED]
    acc = comp["accuracy"]
    dense_configs = {label: c[regime]["p50_ms"] for label, c in cfgs.items() if label != COMPILED}
    contention = (measured.get("timing") or {}).get("contention")
    est = paired_speedup(cfgs[DENSE][regime], comp[regime], contention)
    out = {
        "dense_p50_ms": dense_p50,
        "compiled_p50_ms": comp[regime]["p50_ms"],
        # the median of per-round ratios (paired rounds), with its 95 % interval and verdict
        "speedup_vs_dense": est.median,
        "speedup_interval": est.to_dict(),
        "verdict": est.verdict,
        "cpu_ms": {label: c[regime].get("cpu_p50_ms") for label, c in cfgs.items()},
        "timing": measured.get("timing"),
        "max_abs_diff": acc["max_abs_diff"],
        "cosine": acc["cosine"],
        "accuracy": acc,
        "latency": {label: {k: c[k] for k in ("prefill", "decode") if k in c} for label, c in cfgs.items()},
        "dense_configs_p50_ms": dense_configs,
        "batch_size": opts.batch_size,
        "seqlen": inputs.seqlen,
        "threads": opts.threads,
        "runs": opts.runs,
        "files": {label: _display_path(c["file"], root) for label, c in cfgs.items()},
        "size": sizes,
        "precision": comp["details"].get("precision"),
        "sparse_kernels": comp["details"].get("sparse_kernels"),
        "runtime": comp["details"],
        "notes": list(inputs.notes),
    }
    # the dense model in the compiled model's own int8 form (same variant directory), when there is one
    variant_dir = Path(comp["file"]).parent.name
    same = [label for label in cfgs if label not in (COMPILED, DENSE) and Path(cfgs[label]["file"]).parent.name == variant_dir]
    if same:
        out["speedup_vs_dense_same_precision"] = cfgs[same[0]][regime]["p50_ms"] / comp[regime]["p50_ms"]
    for label, c in cfgs.items():
        if label not in (COMPILED, DENSE) and "accuracy" in c:
            out.setdefault("dense_int8_accuracy", {})[label] = c["accuracy"]
    if "decode" in comp:
        dest = paired_speedup(cfgs[DENSE]["decode"], comp["decode"], comp["decode"].get("contention"))
        out["decode"] = {"dense_p50_ms": cfgs[DENSE]["decode"]["p50_ms"], "compiled_p50_ms": comp["decode"]["p50_ms"],
                         "speedup_vs_dense": dest.median, "speedup_interval": dest.to_dict(), "verdict": dest.verdict,
                         "dense_tokens_per_s": cfgs[DENSE]["decode"]["tokens_per_s"],
                         "compiled_tokens_per_s": comp["decode"]["tokens_per_s"], "new_tokens": comp["decode"]["new_tokens"],
                         "same_tokens_as_dense": comp["decode"]["same_tokens_as_dense"],
                         "dense_configs_p50_ms": {label: c["decode"]["p50_ms"] for label, c in cfgs.items() if label != COMPILED}}
    return out


def paired_speedup(dense: dict[str, Any], compiled: dict[str, Any],
                   contention: dict[str, Any] | None = None) -> SpeedupEstimate:
    """dense time / compiled time over the paired rounds both timings recorded; `contention`: the
    record of the span they were timed in (runtimes/measure/contention.py)."""
    return speedup(dense["rounds_ms"], compiled["rounds_ms"], load=load_average(), contention=contention)


def apply_gates(results: dict[str, dict[str, Any]], opts: VerifyOptions) -> None:
    """speedup_vs_fastest_dense across backends, then the gates → passed (+ why not)."""
    fastest = None
    for name, r in results.items():
        for label, p50 in r["dense_configs_p50_ms"].items():
            if fastest is None or p50 < fastest["p50_ms"]:
                fastest = {"backend": name, "config": label, "p50_ms": p50}
    for r in results.values():
        r["fastest_dense"] = fastest
        r["speedup_vs_fastest_dense"] = fastest["p50_ms"] / r["compiled_p50_ms"]
        failures = []
        r["inconclusive"] = False
        if opts.min_speedup is not None:
            est = SpeedupEstimate(**r["speedup_interval"])
            if est.verdict == "inconclusive":
                r["inconclusive"] = True
                failures.append(f"speedup inconclusive ({est.reason}): no speed gate passes on it")
            elif not gate_passes(est, opts.min_speedup):
                failures.append(f"speedup {est.median:.3f}x [{est.low:.3f}, {est.high:.3f}] < min {opts.min_speedup}")
        drop = 1.0 - r["cosine"]
        if opts.max_accuracy_drop is not None and drop > opts.max_accuracy_drop:
            failures.append(f"accuracy drop {drop:.4f} > max {opts.max_accuracy_drop}")
        r["accuracy_drop"] = drop
        r["gates"] = {"min_speedup": opts.min_speedup, "max_accuracy_drop": opts.max_accuracy_drop, "failures": failures}
        r["passed"] = not failures


# -- entry point -----------------------------------------------------------------------------------
def verify_backends(root: Path, manifest: dict[str, Any], backends: tuple[str, ...] | list[str], registry: Any,
                    options: dict[str, Any] | None = None) -> dict[str, Any]:
    from runtimes.registry_helpers import check_backends_available

    opts = VerifyOptions.from_dict(options)
    root = Path(root)
    lowering = manifest.get("lowering")
    if not lowering:
        raise SparsecError(f"artifact '{root}' has no lowered model: run `sparsec lower {root} --backend B` (or compile with --backend)")
    backends = tuple(backends)
    check_backends_available(registry, backends)
    dense_root = dense_reference(manifest, options, backends, registry)
    inputs = build_inputs(root, lowering, opts)
    machine = record_machine(threads=opts.threads)
    size_cache: dict[Path, dict[str, int]] = {}
    results: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="sparsec-verify-"))
    try:
        for name in backends:
            backend = registry.get_backend(name)()
            configs = model_configs(root, manifest, backend, dense_root, backends, registry)
            measured = measure_backend(backend, configs, lowering, inputs, opts, work / name)
            sizes = {label: _sizes(p, root, lowering, size_cache) for label, p in configs.items()}
            results[name] = summarize(root, measured, sizes, opts, inputs)
            if backend.licence_notice:
                results[name]["licence"] = backend.licence_notice
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine.finish()
    for r in results.values():
        r["machine"] = machine.to_dict()
    apply_gates(results, opts)
    plot_latency(results, root / "plots" / "latency.png")
    return results


def plot_latency(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: p50 per configuration per backend (whiskers to p90), prefill (and decode)."""
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = ["prefill"] + (["decode"] if any("decode" in r for r in results.values()) else [])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 3.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        labels, p50, p90, colors = [], [], [], []
        for name, r in results.items():
            for label, lat in r["latency"].items():
                if regime not in lat:
                    continue
                labels.append(f"{name}\n{label}")
                p50.append(lat[regime]["p50_ms"])
                p90.append(lat[regime]["p90_ms"])
                colors.append("#228833" if label == COMPILED else "#4477aa")
        x = np.arange(len(labels))
        ax.bar(x, p50, color=colors, yerr=[np.zeros(len(p50)), np.maximum(np.array(p90) - np.array(p50), 0)], capsize=3)
        ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("latency p50 (ms), whisker p90")
        any_r = next(iter(results.values()))
        ax.set_title(f"{regime}: batch {any_r['batch_size']}, seq {any_r['seqlen']}, {any_r['threads']} threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
