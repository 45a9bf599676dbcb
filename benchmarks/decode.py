"""Decode speed of sparse causal LMs against the memory-bandwidth roofline (issue #7).

    python benchmarks/decode.py --models 0.5b                           # the 0.5B part first
    python benchmarks/decode.py --models 0.5b,1.1b --sparsities 0,0.5,0.7,0.8 --tokens 128

Llama-architecture models of ~0.5B and ~1.1B parameters (random initialisation, fp32 source, built
in-process once and cached), batch 1, a `--prompt`-token prompt, `--tokens` generated tokens,
`--threads` threads. Each sparsity (uniform magnitude pruning of every block layer) is compiled with
sparsec's own passes and lowering, with and without int8 (`quantize{scheme=int8-dynamic}` on every
layer, LM head included: onnxruntime runs MatMulInteger, OpenVINO QDQ, DeepSparse QLinearMatMul),
then decoded on every backend by runtimes/decode/decoders.py — one subprocess per configuration, so peak RSS
is that configuration's alone (DeepSparse: its worker; its prefill engine is freed before decoding).

Resumable and bounded: compiled models are cached under `--cache`; each finished configuration is
appended to `--out` (JSON) at once and skipped by later runs (`--retry-errors` reruns failed ones);
`--max-minutes` stops launching new work. At the end: a table, the issue's three targets, and a plot
(`decode.png` beside the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import RESULTS, ROOT, repo_relative

MODELS = {  # Llama shapes: ~0.5B (24 × 17.2M + 2 × 41M) and TinyLlama-1.1B's; "tiny" smoke-tests the script
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, vocab_size=8000),
    "0.5b": dict(hidden_size=1280, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4,
                 intermediate_size=3456, vocab_size=32000),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000),
}
QUANTS = ("none", "int8")
GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.5b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--sparsities", default="0,0.5,0.7,0.8")
    ap.add_argument("--quants", default="none,int8")
    ap.add_argument("--backends", default="onnxruntime,openvino,deepsparse")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-decode")
    ap.add_argument("--out", type=Path, default=RESULTS / "decode.json")
    ap.add_argument("--max-minutes", type=float, default=240.0)
    ap.add_argument("--timeout-minutes", type=float, default=45.0, help="per build / per decode subprocess")
    ap.add_argument("--retry-errors", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="print table/targets/plot from --out, run nothing")
    ap.add_argument("--one", nargs=4, metavar=("MODEL", "SPARSITY", "QUANT", "BACKEND"), help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=3, metavar=("MODEL", "SPARSITY", "QUANT"), help=argparse.SUPPRESS)
    ap.add_argument("--membw", type=float, default=0.0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def key(model: str, sparsity: float, quant: str, backend: str, threads: int) -> str:
    return f"{model}/s{round(sparsity * 100):02d}/{quant}/{backend}/t{threads}"


# -- models and their compiled forms (cached) ------------------------------------------------------
PRETRAINED = {"smollm2": "smollm2"}  # real weights: SmolLM2-135M-Instruct (built in, from its GGUF)


def source_dir(cache: Path, model: str) -> Path:
    """The random-init fp32 Llama as a Hugging Face directory (with a stdlib-trained tokenizer), or the
    built-in pretrained model's directory."""
    if model in PRETRAINED:
        from compiler.trace import builtin_model_path

        return builtin_model_path(PRETRAINED[model])
    out = cache / model / "source"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compiler.tiny_models import train_tokenizer

    tmp = out.with_name("source.tmp")
    config = LlamaConfig(**MODELS[model], max_position_embeddings=2048, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"], bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    net = LlamaForCausalLM(config).eval()
    net.save_pretrained(tmp, safe_serialization=True)
    train_tokenizer(vocab_size=8000).save_pretrained(tmp)
    tmp.rename(out)
    return out


def pipeline_spec(sparsity: float, quant: str) -> str | None:
    parts = []
    if sparsity > 0:
        parts += [f"sparsity-allocation{{method=uniform,target={sparsity}}}", "prune{method=magnitude}"]
    if quant == "int8":
        parts.append("quantize{scheme=int8-dynamic,include_outside_blocks=true,max_activation_ratio=0}")
    return ",".join(parts) or None


def artifact_dir(cache: Path, model: str, sparsity: float, quant: str) -> Path:
    return cache / model / f"s{round(sparsity * 100):02d}-{quant}"


def build(cache: Path, model: str, sparsity: float, quant: str, backends: tuple[str, ...]) -> Path:
    """Compile (prune + quantize decisions) and lower one configuration; `lowering.json` marks it done."""
    out = artifact_dir(cache, model, sparsity, quant)
    if (out / "lowering.json").is_file():
        return out
    from compiler.calibration import CalibrationConfig, build_calibration
    from compiler.lowering.lower import lower_artifact
    from compiler.pass_infra import PassContext
    from compiler.pipeline import Pipeline
    from compiler.registry import Registry
    from compiler.trace import load_and_trace

    ir = load_and_trace(str(source_dir(cache, model)))
    calib = build_calibration(ir, CalibrationConfig(samples=4, seqlen=32))
    spec = pipeline_spec(sparsity, quant)
    started = time.perf_counter()
    if spec:
        ctx = PassContext(calibration=lambda: calib, seed=0, progress=lambda *a: None, extras={})
        ir = Pipeline.from_spec(spec, Registry.default()).run(ir, ctx, []).ir
        ir.refresh_measured_sparsity()
    registry = Registry.default()
    # OpenVINO runs the ORT-QDQ variant; backends that run their own lowered form (sparsec: packed weights
    # beside the HF model) write it after the ONNX lowering, as the compile driver does
    lowered_backends = tuple(b for b in backends if b != "openvino")
    section = lower_artifact(ir, out, tuple(b for b in lowered_backends if b != "sparsec"), calib=calib)
    if "sparsec" in backends:
        from compiler.compile import save_model
        from runtimes.base import lower_for_backends

        save_model(ir, out / "model")
        lower_for_backends(registry, ("sparsec",), out, section, {n: p.to_dict() for n, p in ir.plan.items()}, {})
    section["pipeline"] = spec
    section["compile_seconds"] = time.perf_counter() - started
    section["measured_sparsity"] = _block_sparsity(ir)
    (out / "lowering.json").write_text(json.dumps(section, indent=1, default=str))
    return out


def _block_sparsity(ir) -> float:
    zeros = total = 0
    for name, layer in ir.layers.items():
        if layer.block is not None:
            w = ir.weight(name)
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


# -- one decode measurement (in its own process) -----------------------------------------------------
def run_one(args: argparse.Namespace, model: str, sparsity: float, quant: str, backend_name: str) -> dict:
    import numpy as np

    from compiler.lowering.files import model_file
    from compiler.registry import Registry
    from runtimes.decode.decoders import DecodeOptions
    from runtimes.measure.decode_bench import decode_row

    art = artifact_dir(args.cache, model, sparsity, quant)
    lowering = json.loads((art / "lowering.json").read_text())
    backend = Registry.default().get_backend(backend_name)()
    path = art / model_file(lowering, backend_name)
    deepsparse = backend_name == "deepsparse"
    opts = DecodeOptions(prompt_len=args.prompt, new_tokens=args.tokens, threads=args.threads, release_prefill=deepsparse)
    vocab = MODELS[model]["vocab_size"] if model in MODELS else 8000
    ids = np.random.default_rng(0).integers(3, vocab, size=(1, args.prompt))
    row = decode_row(backend, "dense" if sparsity == 0 else f"{sparsity:.0%} sparse", path, lowering, opts, ids,
                     np.ones_like(ids), args.membw, art / f"work-{backend_name}", warmup=not deepsparse)
    kv_full = 2 * lowering["kv"]["layers"] * lowering["kv"]["kv_heads"] * lowering["kv"]["head_dim"] * 4 * (args.prompt + args.tokens)
    limit = 1.2 * row["weights_resident_bytes"] + kv_full + GIB
    variant = str(path.relative_to(art))
    row.update(model=model, sparsity=sparsity, quant=quant, variant=variant, file=repo_relative(path),
               compressed_disk_bytes=lowering.get("sizes", {}).get(variant, {}).get("compressed_bytes"),
               measured_sparsity=lowering.get("measured_sparsity"), kv_cache_bytes=kv_full,
               rss_limit_bytes=int(limit), rss_target_met=row["peak_rss_bytes"] <= limit)
    row.pop("tokens", None)
    return row


# -- the driver --------------------------------------------------------------------------------------
def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": {}, "meta": {}}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


def _child(argv: list[str], timeout_s: float) -> tuple[int, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout_s:.0f} s"
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def drive(args: argparse.Namespace) -> dict:
    from runtimes.measure.membw import measure_read_bandwidth

    results = load_results(args.out)
    deadline = time.monotonic() + args.max_minutes * 60
    membw = measure_read_bandwidth(threads=args.threads)
    results["meta"].setdefault("membw", []).append({**membw.to_dict(), "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "load_average": os.getloadavg()[0]})
    results["meta"].update(prompt=args.prompt, tokens=args.tokens, cpu=_cpu_name())
    save_results(args.out, results)
    backends = tuple(b for b in args.backends.split(",") if b)
    common = ["--cache", str(args.cache), "--prompt", str(args.prompt), "--tokens", str(args.tokens),
              "--threads", str(args.threads), "--membw", str(membw.best_gbps)]
    for model in [m for m in args.models.split(",") if m]:
        for sparsity in [float(s) for s in args.sparsities.split(",") if s]:
            for quant in [q for q in args.quants.split(",") if q]:
                todo = [b for b in backends if _wanted(results, key(model, sparsity, quant, b, args.threads), args.retry_errors)]
                if not todo:
                    continue
                if time.monotonic() > deadline:
                    print(f"--max-minutes reached: stopping before {model} {sparsity:.0%} {quant}", flush=True)
                    return results
                rc, tail = _child(["--build", model, str(sparsity), quant, "--cache", str(args.cache),
                                   "--backends", args.backends], args.timeout_minutes * 60)
                if rc != 0:
                    for b in todo:
                        results["rows"][key(model, sparsity, quant, b, args.threads)] = {"error": f"build failed (rc {rc}): {tail[-800:]}"}
                    save_results(args.out, results)
                    continue
                for b in todo:
                    rc, tail = _child(["--one", model, str(sparsity), quant, b, *common], args.timeout_minutes * 60)
                    k = key(model, sparsity, quant, b, args.threads)
                    if rc == 0:
                        results["rows"][k] = json.loads([line for line in tail.strip().splitlines() if line.startswith("{")][-1])
                        r = results["rows"][k]
                        print(f"{k}: {r['tokens_per_s']:.2f} tokens/s, {r['weight_bytes_per_token'] / 1e6:.0f} MB/token, "
                              f"{100 * r['fraction_of_membw']:.0f}% of membw, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
                    else:
                        results["rows"][k] = {"error": f"rc {rc}: {tail[-800:]}"}
                        print(f"{k}: FAILED rc {rc}", flush=True)
                    save_results(args.out, results)
    return results


def _wanted(results: dict, k: str, retry_errors: bool) -> bool:
    row = results["rows"].get(k)
    return row is None or ("error" in row and retry_errors)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return "unknown"


# -- report ------------------------------------------------------------------------------------------
def targets(rows: list[dict]) -> dict:
    """The issue's three targets, per model and thread count."""
    out = {}
    for model, threads in sorted({(r["model"], r["threads"]) for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["threads"] == threads]
        dense = [r for r in mine if r["sparsity"] == 0]
        s70 = [r for r in mine if abs(r["sparsity"] - 0.7) < 1e-9 and r["quant"] == "int8"]
        best_dense = max(dense, key=lambda r: r["tokens_per_s"], default=None)
        best70 = max(s70, key=lambda r: r["tokens_per_s"], default=None)
        best = max(mine, key=lambda r: r["fraction_of_membw"], default=None)
        fastest = max(mine, key=lambda r: r["tokens_per_s"], default=None)
        out[f"{model}, {threads} threads"] = {
            "speedup_70_int8_vs_fastest_dense": {
                "target": 2.0, "best_70_int8": _label(best70), "fastest_dense": _label(best_dense),
                "value": best70["tokens_per_s"] / best_dense["tokens_per_s"] if best70 and best_dense else None},
            "fraction_of_membw": {"target": 0.6, "best": _label(best), "value": best["fraction_of_membw"] if best else None,
                                  "fastest": _label(fastest),
                                  "fastest_value": fastest["fraction_of_membw"] if fastest else None},
            "rss": {"target": "peak RSS <= 1.2 x weights in memory + KV cache + 1 GiB",
                    "met": [_label(r) for r in mine if r["rss_target_met"]],
                    "missed": [_label(r) for r in mine if not r["rss_target_met"]]},
        }
        for t in out[f"{model}, {threads} threads"].values():
            if "value" in t and t["value"] is not None and isinstance(t["target"], float):
                t["met"] = t["value"] >= t["target"]
    return out


def _label(r: dict | None) -> str | None:
    if r is None:
        return None
    return f"{r['backend']} {r['sparsity']:.0%} {r['quant']} ({r['tokens_per_s']:.2f} tok/s)"


def report(results: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [r for r in results["rows"].values() if "error" not in r]
    errors = {k: r["error"] for k, r in results["rows"].items() if "error" in r}
    table = Table("model", "threads", "sparsity", "int8", "backend", "precision", "tok/s", "step ms", "prefill ms", "MB/token",
                  "kernels", "GB/s", "% membw", "peak RSS GiB", "RSS limit GiB", "load RSS MB", "disk MB", "deflated MB", "load avg")
    for r in sorted(rows, key=lambda r: (r["model"], r["threads"], r["sparsity"], r["quant"], r["backend"])):
        table.add_row(r["model"], str(r["threads"]), f"{r['sparsity']:.0%}", "yes" if r["quant"] == "int8" else "no", r["backend"],
                      str(r.get("precision")), f"{r['tokens_per_s']:.2f}", f"{r['step_p50_ms']:.1f}", f"{r['prefill_ms']:.0f}",
                      f"{r['weight_bytes_per_token'] / 1e6:.0f}", "sparse" if r["sparse_kernels"] else "dense",
                      f"{r['achieved_gbps']:.2f}", f"{100 * r['fraction_of_membw']:.0f}%", f"{r['peak_rss_bytes'] / GIB:.2f}",
                      f"{r['rss_limit_bytes'] / GIB:.2f}", f"{(r.get('rss_load_delta_bytes') or 0) / 1e6:.0f}",
                      f"{r['disk_bytes'] / 1e6:.0f}", f"{(r.get('compressed_disk_bytes') or 0) / 1e6:.0f}",
                      f"{r.get('load_average') or 0:.1f}")
    console = Console(width=220)
    console.print(table)
    membw = results["meta"].get("membw", [{}])
    console.print("streaming-read bandwidth: " + ", ".join(
        f"{m.get('best_gbps')} GB/s ({m.get('threads')} threads, load {m.get('load_average', 0):.1f}, {m.get('at')})" for m in membw))
    if errors:
        for k, e in errors.items():
            console.print(f"[red]{k}[/red]: {' '.join(e.split())[:300]}")
    if rows:
        results["targets"] = targets(rows)
        console.print_json(json.dumps(results["targets"]))
        save_results(out, results)
        plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(6.5 * len(groups), 8), squeeze=False)
    for col, (model, threads) in enumerate(groups):
        for backend in sorted({r["backend"] for r in rows}):
            for quant, style in (("none", "--"), ("int8", "-")):
                pts = sorted(((r["sparsity"], r) for r in rows if r["model"] == model and r["threads"] == threads
                              and r["backend"] == backend and r["quant"] == quant), key=lambda p: p[0])
                if not pts:
                    continue
                xs = [100 * s for s, _ in pts]
                label = f"{backend} {'int8' if quant == 'int8' else 'fp32'}"
                axes[0][col].plot(xs, [r["tokens_per_s"] for _, r in pts], style, marker="o", label=label)
                axes[1][col].plot(xs, [100 * r["fraction_of_membw"] for _, r in pts], style, marker="o", label=label)
        axes[0][col].set_title(f"Llama {model}: greedy decode, batch 1, {threads} threads")
        axes[0][col].set_ylabel("tokens/s")
        axes[1][col].set_ylabel("weight bytes read / s, % of measured bandwidth")
        axes[1][col].axhline(60, color="grey", lw=0.8, ls=":")
        for ax in axes[:, col]:
            ax.set_xlabel("unstructured sparsity of the block layers (%)")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.build:
        model, sparsity, quant = args.build
        build(args.cache, model, float(sparsity), quant, tuple(b for b in args.backends.split(",") if b))
        return 0
    if args.one:
        model, sparsity, quant, backend = args.one
        print(json.dumps(run_one(args, model, float(sparsity), quant, backend), default=str))
        return 0
    unknown = [m for m in args.models.split(",") if m and m not in MODELS and m not in PRETRAINED]
    if unknown:
        print(f"unknown model {unknown[0]} (known: {', '.join([*MODELS, *PRETRAINED])})", file=sys.stderr)
        return 1
    results = load_results(args.out) if args.report_only else drive(args)
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
