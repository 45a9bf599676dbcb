"""The torch.ops.sparsec.* operators, loaded from the library `runtimes.kernels.build` made.

Loading never compiles: a missing or stale library (sources changed since the build) is a one-line
`error:` naming the command that builds it (`make venv` runs it). Fake (meta) implementations are
registered so the ops trace under torch.compile.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

ISAS = ("avx512", "avx2", "portable")
_lock = threading.Lock()
_loaded = False


class KernelLibraryError(RuntimeError):
    """The kernel library is not built for the current sources."""


def load() -> None:
    """Load the kernel library once (idempotent)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        import torch

        from runtimes.kernels.build import library_path

        lib = library_path()
        if not lib.is_file():
            raise KernelLibraryError(f"error: sparsec kernels not built for these sources ({lib} missing): "
                                     "run `make venv` or `.venv/bin/python -m runtimes.kernels.build`")
        torch.ops.load_library(str(lib))
        _register_fakes()
        _loaded = True


def _register_fakes() -> None:
    import torch

    def out_like(x, n):
        return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)

    torch.library.register_fake("sparsec::sparse_linear_i8")(
        lambda x, masks, tile_ptr, values, scales, rowsum, bias, n: out_like(x, n))
    torch.library.register_fake("sparsec::dense_linear_i8")(lambda x, q, scales, rowsum, bias, n: out_like(x, n))
    torch.library.register_fake("sparsec::sparse_linear_f32")(lambda x, masks, tile_ptr, values, bias, n: out_like(x, n))
    torch.library.register_fake("sparsec::sparse_linear_bf16")(lambda x, masks, tile_ptr, values, bias, n: out_like(x, n))
    torch.library.register_fake("sparsec::dense_linear_bf16")(lambda x, q, bias, n: out_like(x, n))
    torch.library.register_fake("sparsec::sparse_linear_i4")(
        lambda x, masks, tile_ptr, values, scales, zeros, comp, bias, n: out_like(x, n))
    torch.library.register_fake("sparsec::dense_linear_i4")(lambda x, q, scales, zeros, comp, bias, n: out_like(x, n))
    # the lean decoder host's ops (csrc/decoder_ops.cpp)
    torch.library.register_fake("sparsec::add_rms_norm")(lambda x, delta, w, eps: torch.empty_like(x))
    torch.library.register_fake("sparsec::silu_mul")(lambda gu: out_like(gu, gu.shape[-1] // 2))
    torch.library.register_fake("sparsec::rope_attention")(
        lambda qkv, ck, cv, starts, cos, sin, heads, kv_heads, scale: out_like(qkv, heads * ck.shape[-1]))


def ops():
    """torch.ops.sparsec, loaded."""
    import torch

    load()
    return torch.ops.sparsec


def isa() -> str:
    """The kernel ISA in use (SPARSEC_KERNEL_ISA, else the best this CPU supports)."""
    return ops().isa()


def available_isas() -> list[str]:
    return list(ops().available_isas())


def set_isa(name: str) -> None:
    ops().set_isa(name)


@contextmanager
def forced_isa(name: str) -> Iterator[None]:
    """Run a block with the kernels of `name` (tests exercise every path the CPU has)."""
    previous = isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(previous)


def env_isa() -> str | None:
    value = os.environ.get("SPARSEC_KERNEL_ISA")
    return value or None
