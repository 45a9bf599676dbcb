"""Verification: does the compiled model run faster than the dense one, on the same backend, and
how far are its outputs from the dense model's?

`verify_backends(root, manifest, backends, registry, options) -> dict` (called by `sparsec compile
--backend` and `sparsec verify`). For every backend it builds the dense reference (the source model
lowered the same way, cached outside the artifact: `compiler.lowering.dense_reference`) and the
compiled model, then:
- accuracy on real tokenized text (the held-out stdlib corpus): encoders — cosine of mean-pooled
  embeddings (as `sparsec eval`) and per-token cosine; causal LMs — cosine of the logits per position
  and top-1 agreement; max |Δ| over valid tokens. Always compiled vs dense fp32 on the same backend;
- latency, INTERLEAVED: every configuration is warmed up, then timed round-robin (the order rotates
  every round) for `runs` rounds, so drift of the machine hits all of them alike; p50/p90/p99.
  Causal LMs are timed in both regimes: prefill (batch × seqlen) and decode (one token after seqlen);
- dense alternatives: besides dense fp32, the dense model quantized exactly like the compiled plan,
  and the backend's fastest known dense form (onnxruntime: int8-dynamic). `speedup_vs_fastest_dense`
  divides the fastest dense p50 measured on *any* verified backend by the compiled p50;
- artifact size dense vs compiled (on disk and deflate-compressed: sparsity shows up there even when
  the runtime ignores it), and whether sparse kernels ran where the runtime can tell.
Gates: `min_speedup` (vs dense fp32 on the same backend) and `max_accuracy_drop` (1 − cosine) set
`passed=False`; the CLI exits 2. A latency plot goes to `root/plots/latency.png`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compiler.errors import SparsecError
from compiler.lowering.lower import MODEL_FILE, dense_reference, dense_variant_files, file_sizes, model_file, reference_quants
from compiler.lowering.feeds import graph_feeds, long_texts, text_batch
from runtimes.base import Runner, RunnerOptions

COMPILED = "compiled"
DENSE = "dense fp32"


@dataclass(frozen=True)
class VerifyOptions:
    batch_size: int = 1
    seqlen: int = 128
    threads: int = 2
    runs: int = 20
    warmup: int = 3
    min_speedup: float | None = None
    max_accuracy_drop: float | None = None
    accuracy_batches: int = 4
    decode: bool = True  # causal LMs: also time greedy decode of `decode_tokens` tokens after `seqlen` tokens
    decode_tokens: int = 32
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        RunnerOptions(threads=self.threads, batch_size=self.batch_size, seqlen=self.seqlen)  # validates > 0
        if self.runs <= 0 or self.warmup < 0 or self.accuracy_batches <= 0 or self.decode_tokens <= 0:
            raise SparsecError(f"runs, accuracy batches and decode tokens must be > 0, warm-up >= 0 (got runs={self.runs}, "
                               f"warmup={self.warmup}, accuracy_batches={self.accuracy_batches}, "
                               f"decode_tokens={self.decode_tokens})")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "VerifyOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (options or {}).items() if k in names and v is not None})

    def runner_options(self) -> RunnerOptions:
        return RunnerOptions(threads=self.threads, batch_size=self.batch_size, seqlen=self.seqlen)


# -- pure helpers ----------------------------------------------------------------------------------
def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": int(a.size)}


def interleaved_timing(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Warm every call up, then time them round-robin for `runs` rounds, rotating the order each
    round (A B C, B C A, C A B, ...); returns milliseconds per call name."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def compare_outputs(task: str, ref: np.ndarray, got: np.ndarray, valid: np.ndarray | None) -> dict[str, Any]:
    """Accuracy of `got` against `ref` (first graph output): cosine (mean-pooled embeddings for
    encoders, per position for LMs), token/position cosine, max |Δ| over valid tokens, top-1 for LMs."""
    ref = ref.astype(np.float32)
    got = got.astype(np.float32)
    if valid is None or ref.ndim < 3:
        flat_r, flat_g = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
        cos = _cosines(flat_r, flat_g)
        return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                "max_abs_diff": float(np.abs(flat_r - flat_g).max())}
    tok_cos = _cosines(ref, got)[valid]
    out = {"token_cosine": float(tok_cos.mean()), "min_cosine": float(tok_cos.min()),
           "max_abs_diff": float(np.abs(ref - got)[valid].max())}
    if task == "text-generation":
        out["cosine"] = out["token_cosine"]
        out["top1_agreement"] = float((ref.argmax(-1) == got.argmax(-1))[valid].mean())
    else:
        w = valid[..., None].astype(np.float64)
        pooled_r = (ref * w).sum(1) / np.maximum(w.sum(1), 1)
        pooled_g = (got * w).sum(1) / np.maximum(w.sum(1), 1)
        out["cosine"] = float(_cosines(pooled_r, pooled_g).mean())
    return out


def merge_accuracy(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of the mean metrics, min of the minima, max of the maxima over batches."""
    out: dict[str, Any] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        out[key] = min(values) if key.startswith("min") else max(values) if key.startswith("max") else float(np.mean(values))
    return out


# -- inputs ----------------------------------------------------------------------------------------
@dataclass
class InputSet:
    """Fixed-shape feeds: one batch for timing, a few for accuracy (valid-token masks alongside)."""

    timing: dict[str, np.ndarray]
    accuracy: list[tuple[dict[str, np.ndarray], np.ndarray | None]]
    seqlen: int
    notes: list[str] = field(default_factory=list)


def load_tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    for sub in ("onnx", "model"):
        d = root / sub
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            return tok
    return None


def max_positions(root: Path) -> int | None:
    cfg = root / "model" / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text(encoding="utf-8"))
    values = [data[k] for k in ("max_position_embeddings", "n_positions") if isinstance(data.get(k), int)]
    return min(values) if values else None


def build_inputs(root: Path, lowering: dict[str, Any], opts: VerifyOptions, text_source: str = "eval") -> InputSet:
    notes = []
    seqlen = opts.seqlen
    limit = max_positions(root)
    if limit and seqlen > limit:
        notes.append(f"seqlen capped from {seqlen} to the model's {limit} positions")
        seqlen = limit
    if lowering["task"] == "text-generation" and opts.decode and limit and seqlen + opts.decode_tokens > limit:
        seqlen = max(1, limit - opts.decode_tokens)  # room for the decoded tokens
    tokenizer = load_tokenizer(root)
    if lowering["task"] == "module" or tokenizer is None:
        return _random_inputs(root, lowering, opts, seqlen, notes)
    from compiler.calibration import load_texts

    texts = long_texts(load_texts(text_source), min_chars=seqlen * 8)
    batches = []
    for k in range(opts.accuracy_batches):
        chunk = texts[(k * opts.batch_size) % len(texts):][: opts.batch_size] or texts[: opts.batch_size]
        ids, mask = text_batch(tokenizer, chunk, opts.batch_size, seqlen)
        batches.append((graph_feeds(lowering, ids, mask), mask.astype(bool)))
    return InputSet(timing=batches[0][0], accuracy=batches, seqlen=seqlen, notes=notes)


def _random_inputs(root: Path, lowering: dict[str, Any], opts: VerifyOptions, seqlen: int, notes: list[str]) -> InputSet:
    """Plain modules have no tokenizer: seeded random feeds shaped like the graph's inputs."""
    import onnx

    model = onnx.load(str(root / lowering["files"]["model"]), load_external_data=False)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(opts.accuracy_batches):
        feeds = {}
        for inp in model.graph.input:
            t = inp.type.tensor_type
            shape = [opts.batch_size if i == 0 else (d.dim_value or seqlen) for i, d in enumerate(t.shape.dim)]
            np_type = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            feeds[inp.name] = (rng.integers(0, 2, size=shape) if np.issubdtype(np_type, np.integer)
                               else rng.standard_normal(size=shape)).astype(np_type)
        batches.append((feeds, None))
    notes.append("no tokenizer: random inputs shaped like the graph's")
    return InputSet(timing=batches[0][0], accuracy=batches, seqlen=seqlen, notes=notes)


# -- configurations --------------------------------------------------------------------------------
def model_configs(root: Path, manifest: dict[str, Any], backend: str, dense_root: Path,
                  backends: tuple[str, ...]) -> dict[str, Path]:
    """Label → ONNX file for one backend: the compiled model, dense fp32, and dense int8 forms."""
    lowering = manifest["lowering"]
    compiled_rel = model_file(lowering, backend)
    configs = {COMPILED: root / compiled_rel, DENSE: dense_root / MODEL_FILE}
    variant = next((name for name, v in lowering.get("variants", {}).items() if v["file"] == compiled_rel), None)
    for dq in reference_quants(manifest.get("plan", {}), backends):
        files = dense_variant_files(dense_root, dq)
        if dq.role == "same-plan" and variant in files:
            configs[f"dense {variant}"] = files[variant]
        elif dq.role == "alternative" and backend == "onnxruntime":
            configs["dense int8-dynamic"] = files["int8-dynamic"]
    return configs


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
        prefill = interleaved_timing({label: (lambda r=r: r.infer(inputs.timing)) for label, r in runners.items()},
                                     opts.runs, opts.warmup)
        result: dict[str, Any] = {
            "configs": {label: {"file": configs[label], "prefill": percentiles(prefill[label]),
                                **({"accuracy": merge_accuracy(accuracy[label])} if label in accuracy else {}),
                                "details": getattr(runners[label], "details", {})} for label in runners},
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
    out = {
        "dense_p50_ms": dense_p50,
        "compiled_p50_ms": comp[regime]["p50_ms"],
        "speedup_vs_dense": dense_p50 / comp[regime]["p50_ms"],
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
        out["decode"] = {"dense_p50_ms": cfgs[DENSE]["decode"]["p50_ms"], "compiled_p50_ms": comp["decode"]["p50_ms"],
                         "speedup_vs_dense": cfgs[DENSE]["decode"]["p50_ms"] / comp["decode"]["p50_ms"],
                         "dense_tokens_per_s": cfgs[DENSE]["decode"]["tokens_per_s"],
                         "compiled_tokens_per_s": comp["decode"]["tokens_per_s"], "new_tokens": comp["decode"]["new_tokens"],
                         "same_tokens_as_dense": comp["decode"]["same_tokens_as_dense"],
                         "dense_configs_p50_ms": {label: c["decode"]["p50_ms"] for label, c in cfgs.items() if label != COMPILED}}
    return out


def apply_gates(results: dict[str, dict[str, Any]], opts: VerifyOptions) -> None:
    """speedup_vs_fastest_dense across backends, then the gates → passed (+ why not)."""
    fastest = None
    for name, r in results.items():
        for label, p50 in r["dense_configs_p50_ms"].items():
            if fastest is None or p50 < fastest["p50_ms"]:
                fastest = {"backend": name, "config": label, "p50_ms": p50}
    for name, r in results.items():
        r["fastest_dense"] = fastest
        r["speedup_vs_fastest_dense"] = fastest["p50_ms"] / r["compiled_p50_ms"]
        failures = []
        if opts.min_speedup is not None and r["speedup_vs_dense"] < opts.min_speedup:
            failures.append(f"speedup {r['speedup_vs_dense']:.3f}x < min {opts.min_speedup}")
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
        raise SparsecError(f"artifact '{root}' has no lowered model: compile it with --backend to lower it to ONNX")
    backends = tuple(backends)
    check_backends_available(registry, backends)
    dense_root = dense_reference(manifest, options, backends)
    inputs = build_inputs(root, lowering, opts)
    size_cache: dict[Path, dict[str, int]] = {}
    results: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="sparsec-verify-"))
    try:
        for name in backends:
            backend = registry.get_backend(name)()
            configs = model_configs(root, manifest, name, dense_root, backends)
            measured = measure_backend(backend, configs, lowering, inputs, opts, work / name)
            sizes = {label: _sizes(p, root, lowering, size_cache) for label, p in configs.items()}
            results[name] = summarize(root, measured, sizes, opts, inputs)
            if backend.licence_notice:
                results[name]["licence"] = backend.licence_notice
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
