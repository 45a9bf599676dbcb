"""Token-by-token generation of a lowered causal LM on each backend, with its KV cache.

`open_decoder(backend, model_path, lowering, options, workdir) -> Decoder` picks the cache a backend
runs best (the one generation loop and the caches are in runtimes/decode/loop.py):
- onnxruntime, OpenVINO (and any backend with dynamic shapes): the lowered graph as is, in this
  process, `present.*` fed back as `past_key_values.*` (`cache="dynamic"`); `cache="static"` runs
  the fixed-shape graphs below on them too (used to test the static loop against the dynamic one);
- DeepSparse: fixed-shape graphs (runtimes/decode/static_graph.py) — a prefill graph (prompt_len tokens
  after a 1-slot dummy past) and a decode graph (1 token after `prompt_len + new_tokens − 1` past
  slots), masks for the valid slots — compiled in the DeepSparse worker process, which also runs the
  loop (runtimes/decode/deepsparse_loop_server.py): the cache never crosses the pipe.

`Decoder.generate(ids, mask, new_tokens)` → `DecodeTrace` (greedy, batch 1: tokens, prefill ms,
per-step ms, peak RSS while decoding, of the process that holds the weights) for verify/bench;
`Decoder.complete(requests, pad_id, eos_ids)` → `GenResult`s (sampling, stop callbacks) for the server;
both run `loop.generate`. `Decoder.prefill_logits` serves the accuracy checks. `torch_greedy` is the reference:
the torch model of the same weights, same greedy
loop, so `tokens_match` can check every backend token for token.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import SparsecError
from compiler.lowering.feeds import kv_names, lm_feeds
from runtimes.base import RunnerOptions
from runtimes.decode.loop import (
    DecodeTrace,
    DynamicCache,
    GenRequest,
    GenResult,
    KVLayout,
    SamplingParams,
    StaticCache,
    generate,
    left_pad,
    left_pad_prompts,
    rss_bytes,
    static_prefill_feeds,
    static_slots,
)
from runtimes.decode.static_graph import static_kv_graph

CACHES = ("auto", "dynamic", "static", "stateful")  # stateful: backends that keep the cache in the runtime (OpenVINO)
PREFILLS = ("engine", "tokens")


@dataclass(frozen=True)
class DecodeOptions:
    """prompt_len: the longest prompt (the static prefill length); new_tokens: the most tokens one
    generate call produces (sizes the static cache); release_prefill: DeepSparse compiles the
    prefill engine per call and frees it before decoding (half the resident weights)."""

    prompt_len: int = 128
    new_tokens: int = 128
    threads: int = 2
    cache: str = "auto"
    prefill: str = "engine"
    release_prefill: bool = False
    io_binding: bool = True  # onnxruntime: keep the KV cache in its memory between steps (onnxruntime_bound.py)

    def __post_init__(self) -> None:
        for key in ("prompt_len", "new_tokens", "threads"):
            if getattr(self, key) <= 0:
                raise SparsecError(f"decode: {key.replace('_', ' ')} must be > 0, got {getattr(self, key)}")
        if self.cache not in CACHES:
            raise SparsecError(f"decode: cache must be one of {', '.join(CACHES)}, got '{self.cache}'")
        if self.prefill not in PREFILLS:
            raise SparsecError(f"decode: prefill must be one of {', '.join(PREFILLS)}, got '{self.prefill}'")

    @property
    def slots(self) -> int:
        return static_slots(self.prompt_len, self.new_tokens)

    def cache_for(self, backend: Any) -> str:
        """"auto": fixed-shape graphs for a backend that declares `dynamic_shapes = False`."""
        if self.cache != "auto":
            return self.cache
        return "dynamic" if getattr(backend, "dynamic_shapes", True) else "static"


def kv_shapes(lowering: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """past_key_values.* name → (1, kv_heads, 0, head_dim) from the manifest's lowering section."""
    kv = lowering.get("kv")
    if lowering.get("task") != "text-generation" or not kv:
        raise SparsecError("decode needs a causal-LM artifact lowered with its KV cache (task text-generation)")
    return {n: (1, int(kv["kv_heads"]), 0, int(kv["head_dim"])) for n in kv_names(lowering)}


def static_limits(opts: DecodeOptions, prompt_len: int, max_tokens: int) -> str | None:
    """Why a prompt / token budget does not fit fixed-shape graphs compiled for `opts`, or None."""
    if prompt_len > opts.prompt_len:
        return f"a {prompt_len}-token prompt exceeds the static prefill length {opts.prompt_len}"
    if max_tokens > opts.new_tokens:
        return f"{max_tokens} new tokens exceed the static cache sized for {opts.new_tokens}"
    return None


def check_prompt(ids: np.ndarray, mask: np.ndarray, new_tokens: int, opts: DecodeOptions, static: bool) -> None:
    if ids.ndim != 2 or ids.shape[0] != 1 or mask.shape != ids.shape:
        raise SparsecError(f"decode runs batch 1: ids and mask must both be (1, n), got {ids.shape} and {mask.shape}")
    if static and ids.shape[1] > opts.prompt_len:
        raise SparsecError(f"a {ids.shape[1]}-token prompt exceeds the static prefill length {opts.prompt_len}")
    if static and new_tokens > opts.new_tokens:
        raise SparsecError(f"{new_tokens} new tokens exceed the static cache sized for {opts.new_tokens}")


class Decoder:
    """A causal LM loaded for greedy decoding on one backend."""

    backend: str = ""
    cache: str = ""
    details: dict[str, Any]

    # True: `run` takes a batch of prompts at once (a growing cache); False: one request per call
    batched: bool = False

    def run(self, ids: np.ndarray, mask: np.ndarray, requests: list[GenRequest], eos_ids: tuple[int, ...],
            pad_id: int = 0) -> tuple[list[GenResult], DecodeTrace]:  # pragma: no cover - abstract
        """`loop.generate` on this decoder's cache for the (left-padded) prompts `ids`/`mask`, one row per request."""
        raise NotImplementedError

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int, stop_ids: tuple[int, ...] = (),
                 pad_id: int = 0) -> DecodeTrace:
        """Greedy, batch 1: `new_tokens` tokens (fewer at a stop id, which the trace keeps)."""
        if ids.ndim != 2 or ids.shape[0] != 1 or mask.shape != ids.shape:
            raise SparsecError(f"decode runs batch 1: ids and mask must both be (1, n), got {ids.shape} and {mask.shape}")
        request = GenRequest([], SamplingParams(max_tokens=new_tokens))
        return self.run(ids, mask, [request], tuple(stop_ids), pad_id)[1]

    def complete(self, requests: list[GenRequest], pad_id: int, eos_ids: tuple[int, ...]) -> list[GenResult]:
        """Serve requests (sampling, stop callbacks): all at once when the decoder is `batched`, else one by one."""
        groups = [requests] if self.batched else [[r] for r in requests]
        results: list[GenResult] = []
        for group in groups:
            ids, mask = left_pad_prompts([r.prompt for r in group], pad_id)
            results += self.run(ids, mask, group, tuple(eos_ids), pad_id)[0]
        return results

    def check_request(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request cannot run on this decoder (a fixed-shape cache's limits), or None."""
        return None

    def prefill_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # callers: `with contextlib.closing(open_decoder(...)) as decoder:`
        pass


class DynamicDecoder(Decoder):
    """The lowered graph as is on an in-process runner; the cache grows by one slot per token."""

    cache = "dynamic"
    batched = True

    def __init__(self, backend: Any, model_path: Path, lowering: dict[str, Any], opts: DecodeOptions, workdir: Path):
        self.backend = backend.name
        self.lowering = lowering
        kv = lowering["kv"]
        names = tuple(kv_names(lowering))
        self.layout = KVLayout(names, {n: int(kv["kv_heads"]) for n in names}, {n: int(kv["head_dim"]) for n in names},
                               "float32", "position_ids" in lowering["inputs"])
        before = rss_bytes()
        start = time.perf_counter()
        ropts = RunnerOptions(threads=opts.threads, batch_size=1, seqlen=opts.prompt_len)
        self.runner = backend.runner(backend.prepare(Path(model_path), Path(workdir), ropts), ropts)
        self.details = {"cache": self.cache, "load_seconds": time.perf_counter() - start,
                        "rss_load_delta_bytes": rss_bytes() - before, "rss_process": "this process",
                        **getattr(self.runner, "details", {})}

    def run(self, ids, mask, requests, eos_ids, pad_id=0):
        return generate(DynamicCache(self.runner.infer, self.layout, ids, mask), requests, eos_ids)

    def prefill_logits(self, ids, mask) -> np.ndarray:
        return self.runner.infer(lm_feeds(self.lowering, ids, mask))["logits"]

    def close(self) -> None:
        self.runner.close()


def static_graphs(model_path: Path, workdir: Path, opts: DecodeOptions, rewrite: Any = None) -> tuple[Path | None, Path]:
    """(prefill graph or None when the prompt is fed token by token, decode graph) in `workdir`."""
    workdir = Path(workdir)
    decode = static_kv_graph(model_path, workdir / "decode.onnx", 1, opts.slots, rewrite)
    prefill = None
    if opts.prefill == "engine":
        prefill = static_kv_graph(model_path, workdir / "prefill.onnx", opts.prompt_len, 1, rewrite)
    return prefill, decode


class StaticDecoder(Decoder):
    """Fixed-shape prefill/decode graphs on an in-process runner (the static loop, without DeepSparse)."""

    cache = "static"

    def __init__(self, backend: Any, model_path: Path, lowering: dict[str, Any], opts: DecodeOptions, workdir: Path):
        self.backend = backend.name
        self.opts = opts
        self.shapes = kv_shapes(lowering)
        before = rss_bytes()
        start = time.perf_counter()
        prefill, decode = static_graphs(model_path, workdir, opts)
        ropts = RunnerOptions(threads=opts.threads, batch_size=1, seqlen=1)
        self.decode = backend.runner(decode, ropts)
        self.prefill = backend.runner(prefill, ropts) if prefill else None
        self.details = {"cache": self.cache, "slots": opts.slots, "prefill": opts.prefill,
                        "load_seconds": time.perf_counter() - start, "rss_load_delta_bytes": rss_bytes() - before,
                        "rss_process": "this process", **getattr(self.decode, "details", {})}

    def run(self, ids, mask, requests, eos_ids, pad_id=0):
        check_prompt(ids, mask, max(r.params.max_tokens for r in requests), self.opts, True)
        cache = StaticCache(self.prefill.infer if self.prefill else None, self.decode.infer, self.shapes,
                            self.opts.slots, self.opts.prompt_len, ids, mask, pad_id)
        return generate(cache, requests, eos_ids)

    def check_request(self, prompt_len: int, max_tokens: int) -> str | None:
        return static_limits(self.opts, prompt_len, max_tokens)

    def prefill_logits(self, ids, mask) -> np.ndarray:
        if self.prefill is None:
            raise SparsecError("prefill logits need the prefill graph (prefill='engine')")
        check_prompt(ids, mask, 1, self.opts, True)
        pids, pmask = left_pad(ids, mask, self.opts.prompt_len)
        return self.prefill.infer(static_prefill_feeds(pids, pmask, self.shapes))["logits"][:, -ids.shape[1]:]

    def close(self) -> None:
        for r in (self.prefill, self.decode):
            if r is not None:
                r.close()


def open_decoder(backend: Any, model_path: Path, lowering: dict[str, Any], opts: DecodeOptions,
                 workdir: Path) -> Decoder:
    """The decoder `backend` runs best: its own (`Backend.decoder`), else the in-process loop on its
    runner (see the module docstring); `workdir` holds derived graphs."""
    kv_shapes(lowering)  # a causal LM with a KV cache, or a one-line error
    Path(workdir).mkdir(parents=True, exist_ok=True)
    own = backend.decoder(Path(model_path), lowering, opts, Path(workdir))
    if own is not None:
        return own
    cls = StaticDecoder if opts.cache_for(backend) == "static" else DynamicDecoder
    return cls(backend, Path(model_path), lowering, opts, Path(workdir))


def remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)


# -- the torch reference ---------------------------------------------------------------------------
def torch_greedy(model_dir: Path, ids: np.ndarray, mask: np.ndarray, new_tokens: int, stop_ids: tuple[int, ...] = (),
                 threads: int | None = None) -> list[int]:
    """Greedy tokens of the Hugging Face model in `model_dir` (the same weights the graph holds),
    with the same loop as the backends: prefill, then one token per step with its DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM

    from compiler.cache_api import cache_kwargs, output_cache

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()
    tokens: list[int] = []
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = torch.from_numpy(mask.astype(np.int64))
    with torch.no_grad():
        positions = (mask_t.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions, use_cache=True)
        position = int(mask_t.sum())
        while True:
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in stop_ids or len(tokens) >= new_tokens:
                return tokens
            mask_t = torch.cat([mask_t, torch.ones((1, 1), dtype=torch.long)], dim=1)
            out = model(input_ids=torch.tensor([[token]]), attention_mask=mask_t, position_ids=torch.tensor([[position]]),
                        use_cache=True, **cache_kwargs(model, output_cache(out)))
            position += 1


def tokens_match(reference: list[int], got: list[int]) -> dict[str, Any]:
    """Agreement of two greedy token lists: exact match, and the first position where they differ."""
    n = min(len(reference), len(got))
    first = next((i for i in range(n) if reference[i] != got[i]), None)
    if first is None and len(reference) != len(got):
        first = n
    return {"match": first is None, "first_mismatch": first, "compared": max(len(reference), len(got))}
