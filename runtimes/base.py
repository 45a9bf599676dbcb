"""Backend and Runner contracts (after Polygraphy's runners).

A backend module is named `*_backend.py` and imports its runtime lazily (inside methods), so
`sparsec backends` works with no optional runtime installed. `Runner.infer()` is the public entry:
it checks the feeds, times the call and delegates to `infer_impl()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from compiler.errors import SparsecError


@dataclass(frozen=True)
class RunnerOptions:
    threads: int = 2
    batch_size: int = 1
    seqlen: int = 128

    def __post_init__(self) -> None:
        for key in ("threads", "batch_size", "seqlen"):
            if getattr(self, key) <= 0:
                raise SparsecError(f"{key.replace('_', ' ')} must be > 0, got {getattr(self, key)}")


class Runner:
    """Loaded model on a backend. Subclasses implement `infer_impl`, `input_names`, `close`."""

    input_names: tuple[str, ...] = ()
    last_inference_ms: float = 0.0

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise SparsecError(f"missing inputs {missing} (expected {list(self.input_names)})")
        start = time.perf_counter()
        out = self.infer_impl(feeds)
        self.last_inference_ms = (time.perf_counter() - start) * 1e3
        return out

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Backend:
    """A runtime that can build and run a lowered ONNX model."""

    name: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    install_hint: ClassVar[str] = ""
    licence_notice: ClassVar[str | None] = None
    # False: the runner runs only the (batch_size, seqlen) of its options, on the graph prepare() wrote
    # (callers such as the server prepare into a directory of their own and pad to that shape).
    dynamic_shapes: ClassVar[bool] = True

    @classmethod
    def available(cls) -> tuple[bool, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, onnx_path: Path, out_dir: Path, options: RunnerOptions) -> Path:
        """Turn the generic lowered ONNX into this backend's variant (static shapes, IR version...).
        Default: use the file as is."""
        return onnx_path

    def runner(self, model_path: Path, options: RunnerOptions) -> Runner:  # pragma: no cover - abstract
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        ok, reason = self.available()
        return {"name": self.name, "device": self.device, "available": ok, "reason": reason, "install": self.install_hint}
