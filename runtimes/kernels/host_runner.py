"""The sparsec backend's runner and decoder: a torch-hosted HF model whose planned layers run packed.

A *host directory* names what to run: either an artifact's packed directory (ART/sparsec, written by
`pack_artifact`: the compiled model, its planned layers on the sparse kernels) or a directory holding
`host.json` — `{"model_dir": ..., "mode": "dense" | "dense-int8" | "dense-int4", "layers": [...]}` — the
dense references verification times on the same engine: the source model as is (torch's own fp32 GEMM,
the fastest dense fp32 path in this process) or with the same layers on our dense int8 / int4 kernel
(the LM head on dense int8 in both, as in the compiled model). So "speedup vs dense" on this backend compares kernels of one engine, one thread pool.

The runner answers the lowered graph's contract (input names, `last_hidden_state` / `logits`), so
verification compares it with every other backend unchanged. The decoder implements the generation
loop's cache protocol (`runtimes.decode.loop.Cache`) on transformers' DynamicCache: prefill, then one
token per step, rows dropped as requests finish (`batch_select_indices`) — or, for Llama-family models,
on the lean decoder host (runtimes/kernels/lean_decoder.py: ~8 op calls per block, an in-place cache), the
default where the model allows it (`details["host"]` says which ran and why).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from compiler.cache_api import cache_kwargs
from compiler.errors import SparsecError
from runtimes.base import Runner, RunnerOptions
from runtimes.decode.decoders import Decoder
from runtimes.decode.loop import generate, positions_from_mask, rss_bytes

HOST_FILE = "host.json"
DENSE_MODES = ("dense", "dense-int8", "dense-int4", "dense-bf16")


def write_dense_host(directory: Path, model_dir: Path, mode: str, layers: list[str]) -> Path:
    """A host directory for a dense reference (see the module docstring)."""
    if mode not in DENSE_MODES:
        raise ValueError(f"error: dense host mode must be one of {DENSE_MODES}, got '{mode}'")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HOST_FILE).write_text(json.dumps({"model_dir": str(model_dir), "mode": mode, "layers": layers},
                                                  indent=2) + "\n", encoding="utf-8")
    return directory


def load_host(path: Path, threads: int) -> Any:
    """The HostModel a host directory names."""
    import torch

    from runtimes.kernels.pack import WEIGHTS, load_artifact_model, pack_model
    from runtimes.kernels.torch_host import HostModel, load_host_model, swap_in

    torch.set_num_threads(threads)
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return load_host_model(path.parent, path / WEIGHTS, threads=threads)
    spec_file = path / HOST_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"error: '{path}' is neither a packed sparsec directory nor a dense host directory")
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    model_dir = Path(spec["model_dir"])
    model = load_artifact_model(model_dir)
    packed: dict[str, Any] = {}
    if spec["mode"] in DENSE_MODES[1:]:
        plan = {name: {"quant": spec["mode"].removeprefix("dense-")} for name in spec.get("layers", [])}
        packed = swap_in(model, pack_model(model, plan, min_sparsity=2.0))  # 2.0: every layer takes the dense kernel
    archs = list(getattr(model.config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return HostModel(model, causal, packed)


def kernel_counts(host: Any) -> dict[str, int]:
    """How many layers run on each packed kernel kind (verification's "sparse kernels" column)."""
    counts: dict[str, int] = {}
    for module in host.packed.values():
        counts[module.kind] = counts.get(module.kind, 0) + 1
    return counts


def packed_bytes_read(module: Any) -> int:
    """Bytes a batch-1 call of a packed layer reads: its packed arrays less the read-ahead padding."""
    from runtimes.kernels.format import FIELDS, PAD

    total = sum(getattr(module, f).numel() * getattr(module, f).element_size() for f in FIELDS[module.kind])
    if module.kind in PAD:
        total -= PAD[module.kind] * module.values.element_size()
    return total


def packed_nonzeros(module: Any) -> int:
    from runtimes.kernels.format import DENSE_KINDS

    if module.kind in DENSE_KINDS:
        return module.out_features * module.in_features
    if module.kind == "sparse-int4":  # tile_ptr counts bytes of codes
        from runtimes.kernels.format import mask_bits

        return mask_bits(module.masks)
    return int(module.tile_ptr[-1])


def _torch_feeds(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


class HostRunner(Runner):
    """Encoder (or full-sequence LM) inference on the host model; outputs named like the lowered graph."""

    def __init__(self, path: Path, options: RunnerOptions, input_names: tuple[str, ...] = ("input_ids", "attention_mask")):
        from runtimes.kernels.lean_decoder import lean_host
        from runtimes.kernels.ops import isa

        start = time.perf_counter()
        self.host = load_host(Path(path), options.threads)
        self.lean, why = lean_host(self.host)
        self.input_names = input_names
        self.details = {"engine": "torch + sparsec kernels", "kernel_isa": isa(), "threads": options.threads,
                        "host": host_label(why),
                        "packed_layers": {n: m.kind for n, m in self.host.packed.items()},
                        "packed_bytes": self.host.packed_bytes(), "load_seconds": time.perf_counter() - start,
                        "sparse_kernels": kernel_counts(self.host)}

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        mask = feeds.get("attention_mask")
        if self.lean is not None and "input_ids" in feeds and (mask is None or bool(mask.all())):
            # unpadded rows: the lean forward (padded positions keep Hugging Face's semantics below)
            from runtimes.kernels.lean_decoder import lean_logits

            ids = feeds["input_ids"]
            return {"logits": lean_logits(self.lean, ids, np.ones_like(ids))}
        accepted = self._accepted()
        with torch.inference_mode():
            out = self.host.model(**{k: v for k, v in _torch_feeds(feeds).items() if k in accepted}, use_cache=False)
        if self.host.causal:
            return {"logits": out.logits.float().numpy()}
        return {"last_hidden_state": out.last_hidden_state.float().numpy()}

    def _accepted(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.host.model.forward).parameters)

    def layers_run(self) -> dict[str, str]:
        """Packed layers that ran since loading: which layers ran sparse (the sparse-kernel proof)."""
        return self.host.layers_run()


class HostCache:
    """`runtimes.decode.loop.Cache` on transformers' DynamicCache."""

    def __init__(self, model: Any, ids: np.ndarray, mask: np.ndarray):
        from transformers import DynamicCache

        self.model = model
        self.mask = mask.astype(np.int64)
        self.new_ids = ids.astype(np.int64)
        self.past = DynamicCache()

    def prefill(self) -> np.ndarray:
        return self._call()

    def step(self, keep_rows: list[int], tokens: list[int]) -> np.ndarray:
        import torch

        rows = np.asarray(keep_rows, dtype=np.int64)
        if len(rows) != self.mask.shape[0]:
            self.past.batch_select_indices(torch.from_numpy(rows))
        new = np.asarray(tokens, dtype=np.int64)[:, None]
        self.mask = np.concatenate([self.mask[rows], np.ones_like(new)], axis=1)
        self.new_ids = new
        return self._call()

    def _call(self) -> np.ndarray:
        import torch

        positions = positions_from_mask(self.mask, self.new_ids.shape[1])
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(self.new_ids), attention_mask=torch.from_numpy(self.mask),
                             position_ids=torch.from_numpy(positions), use_cache=True, **cache_kwargs(self.model, self.past),
                             logits_to_keep=1)
        return out.logits[:, -1, :].float().numpy()


def host_label(why: str) -> str:
    """What runs the model: the lean decoder host, or Hugging Face's modules and why."""
    return "lean decoder (runtimes/kernels/lean_decoder.py)" if not why else f"hugging face modules ({why})"


class HostDecoder(Decoder):
    """Greedy/sampled decoding through the one generation loop, on the host model with its KV cache: the lean
    decoder host's in-place cache where the model allows it, else transformers' DynamicCache."""

    cache = "dynamic (transformers DynamicCache)"
    batched = True

    def __init__(self, path: Path, threads: int, backend: str = "sparsec", lean: bool = True):
        """`lean=False` (the decode option `cache="dynamic"`): Hugging Face's modules and DynamicCache even where
        the lean host could run the model (the A/B of docs/kernels.md)."""
        from runtimes.kernels.lean_decoder import lean_host
        from runtimes.kernels.ops import isa

        self.backend = backend
        before, start = rss_bytes(), time.perf_counter()
        self.host = load_host(Path(path), threads)
        if not self.host.causal:
            raise ValueError("error: decoding needs a causal LM; this host model is an encoder")
        self.lean, why = lean_host(self.host) if lean else (None, "cache=dynamic")
        if self.lean is not None:
            self.cache = "in-place (lean decoder host)"
            self.positions = int(self.lean.layout.positions)
        self.details = {"cache": self.cache, "host": host_label(why), "engine": "torch + sparsec kernels",
                        "kernel_isa": isa(),
                        "threads": threads, "load_seconds": time.perf_counter() - start,
                        "rss_load_delta_bytes": rss_bytes() - before, "rss_process": "this process",
                        "packed_layers": {n: m.kind for n, m in self.host.packed.items()},
                        "packed_bytes": self.host.packed_bytes(), "sparse_kernels": kernel_counts(self.host)}

    def run(self, ids, mask, requests, eos_ids, pad_id=0):
        if self.lean is not None:
            from runtimes.kernels.lean_decoder import LeanCache

            prompts = [row[m.astype(bool)] for row, m in zip(ids, mask)]  # left padding stripped per row
            longest, new = max(len(p) for p in prompts), max(r.params.max_tokens for r in requests)
            problem = self.check_request(longest, new)
            if problem:
                raise SparsecError(problem)
            cache: Any = LeanCache(self.lean, prompts, longest + new)
        else:
            cache = HostCache(self.host.model, ids, mask)
        results = generate(cache, requests, eos_ids)
        self.details["layers_run"] = len(self.host.layers_run())
        return results

    def weight_traffic(self) -> Any:
        """Weight bytes one decode step reads, as these kernels read them: each packed layer's masks,
        non-zeros and per-row data (`bytes_read`), the layers left in torch whole, one row of each
        embedding table. `sparse_bytes` is that exact total (no estimate of another format)."""
        from torch import nn

        from runtimes.decode.traffic import MIN_MATRIX_ELEMENTS, WeightTraffic

        c = dict(read=0, elements=0, nonzeros=0, row=0, emb=0, other=0, matrices=0)
        for module in self.host.kernels():
            c["read"] += packed_bytes_read(module)
            c["elements"] += module.out_features * module.in_features
            c["nonzeros"] += packed_nonzeros(module)
            c["matrices"] += 1
        embeddings = {id(m.weight) for m in self.host.model.modules() if isinstance(m, nn.Embedding)}
        for p in {id(p): p for p in self.host.model.parameters()}.values():
            size = p.numel() * p.element_size()
            if id(p) in embeddings:
                c["emb"] += size
                c["row"] += size // p.shape[0]
            elif p.dim() == 2 and p.numel() >= MIN_MATRIX_ELEMENTS:
                c["read"] += size
                c["elements"] += p.numel()
                c["nonzeros"] += int((p != 0).sum())
                c["matrices"] += 1
            else:
                c["other"] += size
        return WeightTraffic(c["read"], 0, c["read"], 0, c["elements"], c["nonzeros"], c["row"], c["emb"], c["other"],
                             c["matrices"])

    def check_request(self, prompt_len: int, max_tokens: int) -> str | None:
        if self.lean is not None and prompt_len + max_tokens > self.positions:
            return f"{prompt_len} + {max_tokens} tokens exceed the model's {self.positions} positions"
        return None

    def prefill_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        if self.lean is not None:
            from runtimes.kernels.lean_decoder import lean_logits

            return lean_logits(self.lean, ids, mask)
        positions = positions_from_mask(mask.astype(np.int64), ids.shape[1])
        with torch.inference_mode():
            out = self.host.model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                  attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                  position_ids=torch.from_numpy(positions), use_cache=False)
        return out.logits.float().numpy()
