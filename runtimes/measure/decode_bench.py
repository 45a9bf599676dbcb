"""`sparsec bench ARTIFACT --decode`: greedy decode speed of a causal LM against the memory roofline.

For every backend and configuration (the compiled model, dense fp32, the dense int8 forms — the
same set `sparsec verify` compares), one decoder is loaded at a time (runtimes/decode/decoders.py), warmed
up, then generates `new_tokens` tokens from a `prompt_len`-token prompt of real text. Per row:
tokens/s (decode steps only), prefill ms, the weight bytes one token reads (runtimes/decode/traffic.py:
dense for dense kernels, non-zeros + bitmask where the backend runs sparse kernels), the achieved
bandwidth = bytes/token × tokens/s and its fraction of the machine's streaming-read bandwidth
(runtimes/measure/membw.py, same thread count), peak RSS while decoding, the memory the model took at load,
the file size on disk, whether its greedy tokens equal those of dense fp32 on the same backend, and the
contention record of its timed generate (other processes' CPU meanwhile: runtimes/measure/contention.py).
Rows run one after another (one model in memory at a time, so a 7B artifact fits): `speedup_vs_fastest_dense`
compares runs seconds to minutes apart and carries no interval — the paired decode speedup with its interval
and verdict is `sparsec verify`'s `decode` section.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import SparsecError
from runtimes.decode.decoders import DecodeOptions, open_decoder
from runtimes.decode.traffic import kv_bytes_per_token, weight_traffic
from runtimes.measure.contention import ContentionMeter
from runtimes.measure.dense import COMPILED, DENSE, dense_reference, model_configs
from runtimes.measure.inputs import VerifyOptions, build_inputs, max_positions
from runtimes.measure.machine import record_machine
from runtimes.measure.membw import measure_read_bandwidth
from runtimes.measure.stats import tokens_per_s
from runtimes.measure.timing import cpu_clocks, worker_clocks

WARMUP_TOKENS = 4


def decode_prompt(root: Path, lowering: dict[str, Any], opts: DecodeOptions) -> tuple[np.ndarray, np.ndarray]:
    """A (1, prompt_len) prompt of real held-out text (seeded random ids without a tokenizer)."""
    limit = max_positions(root)
    if limit and opts.prompt_len + opts.new_tokens > limit:
        raise SparsecError(f"prompt {opts.prompt_len} + {opts.new_tokens} new tokens exceed the model's {limit} positions")
    inputs = build_inputs(root, lowering, VerifyOptions(batch_size=1, seqlen=opts.prompt_len, accuracy_batches=1,
                                                        threads=opts.threads, decode=False))
    return inputs.timing["input_ids"], inputs.timing["attention_mask"]


def disk_bytes(path: Path) -> int:
    """The graph plus its external data file, if any."""
    data = Path(path).parent / "model.onnx.data"
    return Path(path).stat().st_size + (data.stat().st_size if data.exists() else 0)


def uses_sparse_kernels(decoder: Any, sparsity: float) -> bool:
    """Whether the backend reads the weights in a sparse form: a decoder that can tell per layer has a
    `sparse_kernels()` method (DeepSparse: its analysis engine), asked when the weights hold zeros;
    others say so in their runner details."""
    if sparsity < 0.05:
        return False
    if callable(getattr(decoder, "sparse_kernels", None)):
        return bool(decoder.sparse_kernels()["used"])
    return bool(decoder.details.get("sparse_kernels"))


HALF_PRECISIONS = frozenset({"bf16", "bfloat16", "f16", "fp16", "float16"})


def runtime_float_itemsize(precision: Any) -> int:
    """Bytes per float32 weight as the runtime holds it: 2 when it reports a half precision
    (OpenVINO says "bfloat16" on AMX machines), else 4."""
    return 2 if str(precision or "").strip().lower() in HALF_PRECISIONS else 4


def decode_row(backend: Any, label: str, path: Path, lowering: dict[str, Any], opts: DecodeOptions, ids: np.ndarray,
               mask: np.ndarray, bandwidth_gbps: float, workdir: Path, warmup: bool = True) -> dict[str, Any]:
    """Load one configuration, warm it up (a few tokens), generate, and measure it against the roofline."""
    with closing(open_decoder(backend, path, lowering, opts, workdir)) as decoder:
        # a decoder that reads its own weight format says what it reads; else the graph's initializers
        traffic = decoder.weight_traffic() if callable(getattr(decoder, "weight_traffic", None)) else weight_traffic(path)
        if warmup:
            decoder.generate(ids, mask, min(WARMUP_TOKENS, opts.new_tokens))
        meter = ContentionMeter(opts.threads, worker_clocks(cpu_clocks({label: decoder}))).start()
        trace = decoder.generate(ids, mask, opts.new_tokens)
        contention = meter.stop()
        sparse = uses_sparse_kernels(decoder, traffic.sparsity)
        details = dict(decoder.details)
    shutil.rmtree(workdir, ignore_errors=True)
    rate = tokens_per_s(trace)
    float_itemsize = runtime_float_itemsize(details.get("precision"))
    per_token = traffic.per_token(sparse, float_itemsize)
    kv = kv_bytes_per_token(lowering, int(mask.sum()) + len(trace.tokens) / 2)
    achieved = per_token * rate / 1e9
    return {
        "backend": backend.name, "config": label, "file": str(path), "tokens": trace.tokens,
        "new_tokens": len(trace.tokens), "prompt_len": int(ids.shape[1]), "threads": opts.threads,
        "tokens_per_s": rate, "step_p50_ms": float(np.median(trace.step_ms)) if trace.step_ms else None,
        "prefill_ms": trace.prefill_ms, "weight_sparsity": traffic.sparsity, "sparse_kernels": sparse,
        "weight_bytes_per_token": per_token, "weights": traffic.to_dict(),
        "weights_resident_bytes": traffic.resident(sparse, float_itemsize), "kv_bytes_per_token": kv,
        "precision": details.get("precision"),
        "achieved_gbps": achieved, "membw_gbps": bandwidth_gbps,
        "fraction_of_membw": achieved / bandwidth_gbps if bandwidth_gbps else None,
        "peak_rss_bytes": trace.peak_rss_bytes, "rss_load_delta_bytes": details.get("rss_load_delta_bytes"),
        "rss_process": details.get("rss_process"), "disk_bytes": disk_bytes(path),
        "cache": details.get("cache"), "load_seconds": details.get("load_seconds"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # other processes' CPU while this row decoded (runtimes/measure/contention.py): a contended row's
        # rate is the machine's, not the model's
        "contention": contention.to_dict(),
    }


def bench_decode(root: Path, manifest: dict[str, Any], backends: tuple[str, ...], registry: Any,
                 opts: DecodeOptions, options: dict[str, Any] | None = None) -> dict[str, Any]:
    from runtimes.registry_helpers import check_backends_available

    lowering = manifest.get("lowering")
    if not lowering or lowering.get("task") != "text-generation":
        raise SparsecError(f"--decode needs a causal-LM artifact lowered to ONNX; '{root}' is "
                           f"{'not lowered' if not lowering else lowering.get('task')}")
    check_backends_available(registry, backends)
    dense_root = dense_reference(manifest, options, backends, registry)
    ids, mask = decode_prompt(root, lowering, opts)
    machine = record_machine(threads=opts.threads)
    bandwidth = measure_read_bandwidth(threads=opts.threads)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="sparsec-decode-"))
    try:
        for name in backends:
            backend = registry.get_backend(name)()
            configs = model_configs(root, manifest, backend, dense_root, backends, registry)
            for label, path in configs.items():
                rows.append(decode_row(backend, label, path, lowering, opts, ids, mask, bandwidth.best_gbps,
                                       work / f"{name}-{len(rows)}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        ref = next((r for r in rows if r["backend"] == row["backend"] and r["config"] == DENSE), None)
        row["same_tokens_as_dense"] = None if ref is None else row["tokens"] == ref["tokens"]
    fastest_dense = max((r for r in rows if r["config"] != COMPILED), key=lambda r: r["tokens_per_s"], default=None)
    best = max(rows, key=lambda r: r["tokens_per_s"], default=None)
    for row in rows:
        row["speedup_vs_fastest_dense"] = row["tokens_per_s"] / fastest_dense["tokens_per_s"] if fastest_dense else None
    return {"machine": machine.finish().to_dict(), "membw": bandwidth.to_dict(), "prompt_len": int(ids.shape[1]),
            "new_tokens": opts.new_tokens,
            "threads": opts.threads, "rows": rows,
            "fastest_dense": _brief(fastest_dense), "fastest": _brief(best)}


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: row[k] for k in ("backend", "config", "tokens_per_s", "achieved_gbps", "fraction_of_membw")}


def print_decode_bench(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    mb = 1e6
    table = Table("backend", "config", "precision", "tok/s", "step ms", "prefill ms", "weight MB/tok", "kernels",
                  "GB/s", "% membw", "peak RSS MB", "load RSS MB", "disk MB", "= dense")
    for r in result["rows"]:
        table.add_row(r["backend"], r["config"], str(r["precision"]), f"{r['tokens_per_s']:.2f}", f"{r['step_p50_ms']:.2f}",
                      f"{r['prefill_ms']:.1f}", f"{r['weight_bytes_per_token'] / mb:.1f}",
                      "sparse" if r["sparse_kernels"] else "dense", f"{r['achieved_gbps']:.2f}",
                      f"{100 * r['fraction_of_membw']:.0f}%", f"{r['peak_rss_bytes'] / mb:.0f}",
                      f"{(r['rss_load_delta_bytes'] or 0) / mb:.0f}", f"{r['disk_bytes'] / mb:.1f}",
                      str(r["same_tokens_as_dense"]))
    console = Console(width=max(Console().width, 160))
    console.print(table)
    bw = result["membw"]
    console.print(f"batch 1, prompt {result['prompt_len']} tokens, {result['new_tokens']} generated, {result['threads']} threads; "
                  f"measured streaming-read bandwidth {bw['best_gbps']:.2f} GB/s (median {bw['median_gbps']:.2f})")
    f, d = result["fastest"], result["fastest_dense"]
    if f and d:
        console.print(f"fastest: {f['backend']} / {f['config']} {f['tokens_per_s']:.2f} tokens/s "
                      f"({100 * f['fraction_of_membw']:.0f}% of memory bandwidth); fastest dense: "
                      f"{d['backend']} / {d['config']} {d['tokens_per_s']:.2f} tokens/s")
    for r in result["rows"]:
        c = r.get("contention") or {}
        if c.get("contended"):
            console.print(f"{r['backend']} / {r['config']}: machine busy while it decoded — other processes used "
                          f"{c['foreign_cores']:.2f} of {c['usable_cpus']} cores: its rate is not the model's",
                          style="bold yellow", markup=False)
    console.print("rows run one after another (no interval); the paired decode speedup is `sparsec verify`'s")
    console.print(f"wrote {out}")


def run_decode_bench(art: Any, backends: tuple[str, ...], registry: Any, thread_counts: tuple[int, ...],
                     prompt_len: int, new_tokens: int, out: Path | None) -> dict[str, Any]:
    """The CLI's `bench --decode`: one decode bench per thread count, written to `out` (default
    ARTIFACT/bench-decode.json) and printed."""
    from compiler.artifact import write_json

    results = {"decode": [bench_decode(art.root, art.manifest, backends, registry,
                                       DecodeOptions(prompt_len=prompt_len, new_tokens=new_tokens, threads=t))
                          for t in thread_counts]}
    if out is None:
        art.update(files={"bench-decode.json": results})
        out = art.root / "bench-decode.json"
    else:
        write_json(Path(out), results)
    for result in results["decode"]:
        print_decode_bench(result, out)
    return results
