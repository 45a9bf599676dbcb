"""Scale: compile a Llama-2-7B-shaped model on one machine by streaming blocks (issue 16, docs/streaming.md).

    python benchmarks/scale.py build --shape 7b                      # ~13.5 GB of fp16 shards, block by block
    python benchmarks/scale.py run --shape 1.1b --modes memory,stream --samples 16 --seqlen 256
    python benchmarks/scale.py run --shape 7b --modes stream --blocks 2 --samples 64 --seqlen 256
    python benchmarks/scale.py delete --shape 7b                     # the files are large: remove them after

Shapes: `7b` = Llama-2-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000); `1.1b` = TinyLlama
(hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, vocab 32000). Weights are random (normal, std
0.02; norms 1), generated and written one block at a time as fp16 safetensors shards under
`${SPARSEC_HOME:-~/.cache/sparsec}/scale/<shape>/`, so the model is never whole in memory. The tokenizer
is the byte-level BPE of compiler/tiny_models.py (512 ids, trained on the stdlib corpus): calibration
and evaluation text is real, but with random weights the perplexity only proves the pipeline runs.

`--blocks N` compiles a view of the first N blocks (config with num_hidden_layers=N, the same shard
files through symbolic links) — for when the whole model cannot be compiled in the time available; the
per-block time then extrapolates the total (the resident set does not grow with depth: one block is
resident at a time). Each compile and each evaluation runs in its own subprocess, so its peak RSS
(ru_maxrss) is its own. Every result records `uptime` and the CPU model. Results:
benchmarks/results/scale-<shape>[-<N>blocks].json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import RESULTS, ROOT

SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, max_position_embeddings=4096),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, max_position_embeddings=2048),
}
VOCAB = 32000
STREAM = {"stream": True, "memory": False, "auto": None}  # --modes: forced streaming, forced in memory, automatic
SPEC = "outlier-analysis,sparsity-allocation{method=owl,target=0.7},prune{method=wanda}"


def home() -> Path:
    return Path(os.environ.get("SPARSEC_HOME") or Path.home() / ".cache" / "sparsec") / "scale"


def shown(path: Path) -> str:
    """A path for the results file: under the home directory as `~/...` (no machine paths committed)."""
    try:
        return "~/" + Path(path).resolve().relative_to(Path.home().resolve()).as_posix()
    except ValueError:
        return str(path)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- build ------------------------------------------------------------------------------------------
def build(shape: str, seed: int = 0) -> Path:
    """Write the random fp16 model block by block; returns its directory (reused when complete)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from compiler.tiny_models import train_tokenizer

    root = home() / shape
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    h, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    LlamaConfig(vocab_size=VOCAB, architectures=["LlamaForCausalLM"], bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16", **dims).save_pretrained(root)
    train_tokenizer().save_pretrained(root)
    gen = torch.Generator().manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float16).mul_(0.02)

    total = layers + 1
    weight_map, size = {}, 0
    started = time.perf_counter()
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                   p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                   p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                   p + "mlp.down_proj.weight": rand(h, inter),
                   p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        size += sum(t.nbytes for t in tensors.values())
        print(f"block {i + 1}/{layers} written ({time.perf_counter() - started:.0f}s)", flush=True)
        del tensors
    outer = {"model.embed_tokens.weight": rand(VOCAB, h), "model.norm.weight": torch.ones(h, dtype=torch.float16),
             "lm_head.weight": rand(VOCAB, h)}
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(outer, str(root / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in outer})
    size += sum(t.nbytes for t in outer.values())
    index.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1), encoding="utf-8")
    return root


def truncated_view(root: Path, blocks: int) -> Path:
    """The first `blocks` blocks of the model at `root`: config + index rewritten, shards linked."""
    view = root.parent / f"{root.name}-{blocks}blocks"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir()
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    config["num_hidden_layers"] = blocks
    (view / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    index = json.loads((root / "model.safetensors.index.json").read_text(encoding="utf-8"))
    keep = {k: v for k, v in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1), encoding="utf-8")
    for f in root.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json") and (f.suffix != ".safetensors" or f.name in set(keep.values())):
            (view / f.name).symlink_to(f.resolve())
    return view


# -- one compile / one evaluation (child processes) ------------------------------------------------
def child_compile(model: str, out: str, mode: str, samples: int, seqlen: int, max_memory: str | None) -> dict:
    from compiler.calibration import CalibrationConfig
    from compiler.compile import CompileOptions, compile_model
    from compiler.streaming.memory import GIB, parse_size, peak_rss

    marks: list[tuple[str, int, float]] = []
    started, cpu0 = time.perf_counter(), cpu_seconds()

    def progress(what: str, done: int, total: int) -> None:
        marks.append((what, done, time.perf_counter() - started))

    opts = CompileOptions(model=model, out=Path(out), passes=SPEC, calib=CalibrationConfig(samples=samples, seqlen=seqlen),
                          stream=STREAM[mode], force=True, max_memory=parse_size(max_memory) if max_memory else None)
    class PassStarts:  # an instrument: when each pass starts (block 1's time = its first mark - this)
        def before_pass(self, pass_, ir):
            marks.append((pass_.name, 0, time.perf_counter() - started))

        def after_pass(self, pass_, result, seconds):
            pass

        def on_progress(self, what, done, total):
            pass

    result = compile_model(opts, progress=progress, instruments=[PassStarts()])
    wall = time.perf_counter() - started
    per_block = {}
    for what in ("outlier-analysis", "prune"):
        ts = [t for w, _, t in marks if w == what]  # pass start, then after each block
        per_block[what] = [round(b - a, 2) for a, b in zip(ts, ts[1:])]  # block 1 includes the pass's set-up (full reads)
    disk = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    rep = result.report
    peak = peak_rss()  # before the digest below (which holds one tensor at a time)
    cpu = cpu_seconds()
    digest_started = time.perf_counter()
    weights = weights_digest(Path(out) / "model")
    return {"mode": mode, "plan_sha256": hashlib.sha256(json.dumps(result.manifest["plan"], sort_keys=True).encode()).hexdigest(),
            "weights_sha256": weights, "digest_s": round(time.perf_counter() - digest_started, 1),
            "wall_s": round(wall, 1), "cpu_s": round(cpu - cpu0, 1), "peak_rss_gib": round(peak / GIB, 3),
            "pass_seconds": {p["name"]: p.get("seconds") for p in rep.get("passes", []) if isinstance(p, dict)},
            "block_marks_s": [(w, d, round(t, 1)) for w, d, t in marks if w in ("outlier-analysis", "prune")],
            "per_block_s": per_block, "artifact_gib": round(disk / GIB, 3), "streaming": rep.get("streaming"),
            "sparsity": (rep.get("sparsity") or {}).get("overall_measured")}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process: less sensitive than wall time to a shared machine's load."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def weights_digest(model_dir: Path) -> str:
    """sha256 over the artifact's tensors (sorted names, raw bytes), one tensor in memory at a time:
    equal for two artifacts holding the same weights, whatever their shard layout."""
    from safetensors import safe_open

    where = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            where.update({k: f for k in st.keys()})
    h = hashlib.sha256()
    for key in sorted(where):
        with safe_open(str(where[key]), framework="pt") as st:
            t = st.get_tensor(key)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
    return h.hexdigest()


def torch_uint8():
    import torch

    return torch.uint8


def child_eval(model: str, mode: str, tokens: int, seqlen: int) -> dict:
    from compiler.evaluate import EvalConfig, EvalTarget, evaluate_models
    from compiler.streaming.memory import GIB, peak_rss

    started, cpu0 = time.perf_counter(), cpu_seconds()
    cfg = EvalConfig(seqlen=seqlen, stride=seqlen // 2, max_tokens=tokens, greedy_prompts=0)
    res = evaluate_models(EvalTarget(model, None), "eval", cfg, stream=STREAM[mode])
    return {"mode": mode, "streamed": res["streamed"], "perplexity": res["compiled"], "tokens": res["tokens"], "windows": res["windows"],
            "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_seconds() - cpu0, 1),
            "peak_rss_gib": round(peak_rss() / GIB, 3)}


def spawn(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-3:] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the benchmark ----------------------------------------------------------------------------------
def auto_decision(root: Path, samples: int, seqlen: int) -> dict:
    """What `sparsec compile` without --stream/--no-stream decides for the whole model on this machine now."""
    from compiler.streaming.runner import decide

    return decide(str(root), None, None, samples=samples, seqlen=seqlen).to_dict()


def lower(out: Path, backend: str, timeout: float) -> dict:
    """`sparsec lower OUT --backend B` under /usr/bin/time -v: its peak RSS, wall time and files written."""
    sparsec = Path(sys.executable).parent / "sparsec"
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", str(sparsec), "lower", str(out), "--backend", backend], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    rss = next((int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line), 0)
    onnx = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "model" not in f.relative_to(out).parts[:1])
    return {"backend": backend, "rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(rss / 2**20, 3),
            "files_gib_outside_model": round(onnx / 2**30, 3), "stderr_tail": proc.stderr.strip().splitlines()[-25:-20] if proc.returncode else []}


def run(a: argparse.Namespace) -> Path:
    root = build(a.shape)
    model = truncated_view(root, a.blocks) if a.blocks else root
    layers = a.blocks or SHAPES[a.shape]["num_hidden_layers"]
    name = f"scale-{a.shape}" + (f"-{a.blocks}blocks" if a.blocks else "")
    path = RESULTS / f"{name}.json"
    record = {"shape": a.shape, "dims": SHAPES[a.shape], "blocks_compiled": layers,
              "blocks_in_model": SHAPES[a.shape]["num_hidden_layers"], "pipeline": SPEC,
              "calibration": {"samples": a.samples, "seqlen": a.seqlen, "source": "default (stdlib docstrings, tiny BPE)"},
              "model_dir": shown(model), "weights": "random normal(0, 0.02), fp16 safetensors",
              "command": "nice -n 10 python benchmarks/scale.py " + " ".join(sys.argv[1:]), "runs": [],
              "auto_decision_whole_model": auto_decision(root, a.samples, a.seqlen)}
    for mode in a.modes.split(","):
        out = home() / f"out-{name}-{mode}"
        entry = {"machine_before": machine(),
                 "compile": spawn(["_compile", str(model), str(out), mode, str(a.samples), str(a.seqlen), a.max_memory or ""], a.timeout)}
        if a.eval_tokens and "error" not in entry["compile"]:
            entry["eval"] = spawn(["_eval", str(out / "model"), mode, str(a.eval_tokens), str(a.seqlen)], a.timeout)
        if a.lower and mode == a.modes.split(",")[-1] and "error" not in entry["compile"]:
            entry["lower"] = lower(out, a.lower, a.timeout)
        entry["machine_after"] = machine()
        record["runs"].append(entry)
        shutil.rmtree(out, ignore_errors=True)
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(entry)[:2000], flush=True)
    return path


def interrupt(_signum, _frame):
    raise KeyboardInterrupt  # SIGTERM (timeout, kill) unwinds: the compile removes its temp directories


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, interrupt)
    if len(sys.argv) > 1 and sys.argv[1] == "_compile":
        model, out, mode, samples, seqlen, cap = sys.argv[2:8]
        print(json.dumps(child_compile(model, out, mode, int(samples), int(seqlen), cap or None)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_eval":
        model, mode, tokens, seqlen = sys.argv[2:6]
        print(json.dumps(child_eval(model, mode, int(tokens), int(seqlen))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "run", "delete"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--modes", default="stream", help="comma-separated: stream, memory, auto")
    ap.add_argument("--blocks", type=int, default=0, help="compile only the first N blocks (0: all)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for the streamed perplexity (0: skip)")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--lower", default=None, help="after each compile: sparsec lower OUT --backend THIS (peak RSS of the ONNX lowering)")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    a = ap.parse_args()
    if a.action == "build":
        started = time.perf_counter()
        root = build(a.shape)
        print(f"{shown(root)}: {sum(f.stat().st_size for f in root.glob('*.safetensors')) / 1e9:.2f} GB in {time.perf_counter() - started:.0f}s")
    elif a.action == "delete":
        for p in home().glob(f"{a.shape}*"):
            shutil.rmtree(p, ignore_errors=True)
    else:
        print(f"wrote {run(a).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
