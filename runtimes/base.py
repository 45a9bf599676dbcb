"""Backend and Runner contracts (after Polygraphy's runners).

A backend module is named `*_backend.py` and imports its runtime lazily (inside methods), so
`sparsec backends` works with no optional runtime installed. `Runner.infer()` is the public entry:
it checks the feeds, times the call and delegates to `infer_impl()`.

A backend *declares* what it runs, as class attributes and hooks of `Backend`, so that nothing outside
its module compares its name: adding a backend is its module, its entry point (`sparsec.backends`) and
its tests (docs/architecture.md, "adding a backend"). What the rest of sparsec asks of it:
- `quant_forms` / `quant_form()`: the int8 variant it runs for each quantization scheme (lowering writes it);
- `lowered_by_default`: its variants are written even when it was not requested at compile time;
- `dynamic_shapes`: False when its runner runs only the shapes it was prepared for (the server pads to
  them; causal LMs then decode on fixed-shape graphs);
- `decoder()`: its own decoder for causal LMs, or None for the in-process decoders of runtimes/decode/
  over its runner (verify --decode, bench --decode and serve's completions all go through it);
- `distributions`: what `sparsec package` pins for it, () when it cannot be packaged; `bundle_prepare`: a
  module the bundle's start.sh runs after installing them (native code to build); `write_bundle_artifact()`:
  the slim copy of the artifact its bundle carries instead of the whole artifact (sparsec: runtimes/kernels/slim.py);
- `dense_alternatives`: the dense int8/int4 forms verification times beside dense fp32 on it;
- `lower()`: the lowered form it runs, when it owns one (default: the ONNX lowering's file for it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc): what a runner whose
    model runs in a worker process reports as its `cpu_seconds()`."""
    import os

    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


class Backend:
    """A runtime that can build and run a lowered model. Subclasses set `name` and implement `available`
    and `runner`; the capability attributes below default to "a plain ONNX runtime with dynamic shapes"."""

    name: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    install_hint: ClassVar[str] = ""
    licence_notice: ClassVar[str | None] = None
    # False: the runner runs only the (batch_size, seqlen) of its options, on the graph prepare() wrote
    # (callers such as the server prepare into a directory of their own and pad to that shape).
    dynamic_shapes: ClassVar[bool] = True
    # quantization scheme ("int8" | "int8-dynamic" | "int4" | ...) -> the variant it runs (compiler/lowering/quant.py
    # VARIANTS), or "backend-lowered" (quant.BACKEND_LOWERED) for a form only its own `lower` writes (sparsec's bf16)
    quant_forms: ClassVar[Mapping[str, str]] = {}
    # write its int8 variants even when it is not among the compile's --backend (serve it later without re-lowering)
    lowered_by_default: ClassVar[bool] = False
    # pip distributions `sparsec package` pins for it (besides sparsec's own); () = cannot be packaged
    distributions: ClassVar[tuple[str, ...]] = ()
    # `python -m MODULE` that a bundle's start.sh runs once its requirements are installed (None: nothing to prepare)
    bundle_prepare: ClassVar[str | None] = None
    # dense int8/int4 forms timed beside dense fp32 on this backend: variant -> scheme applied to every block layer
    dense_alternatives: ClassVar[Mapping[str, str]] = {}
    # the dense reference keeps the source model's Hugging Face directory (`model/`) for this backend: it
    # runs models rather than graphs (the sparsec backend)
    needs_source_model: ClassVar[bool] = False

    @classmethod
    def available(cls) -> tuple[bool, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def write_bundle_artifact(self, artifact: Any, out_dir: Path) -> dict[str, Any] | None:
        """Write into `out_dir` the copy of `artifact` (a verified compiler.artifact.Artifact) that a deploy bundle
        for this backend carries, and return its summary; None (the default): the bundle carries the artifact
        byte for byte."""
        return None

    @classmethod
    def quant_form(cls, scheme: str, requested: bool) -> str | None:
        """The int8 variant this backend runs for `scheme` (None: it runs none). `requested`: it is among
        the compile's backends (a backend may pick a costlier form only then, e.g. OpenVINO's NNCF)."""
        return cls.quant_forms.get(scheme)

    def lower(self, artifact_dir: Path, lowering: dict[str, Any], plan: dict[str, Any],
              options: dict[str, Any]) -> str:
        """The artifact-relative file (or directory) this backend runs, written here when the backend owns
        its lowered form (e.g. packed sparse weights beside `model/`). Called by the compile driver after
        the ONNX lowering, for every requested backend. Default: the ONNX lowering's file for it."""
        from compiler.lowering.files import model_file

        return model_file(lowering, self.name)

    def prepare(self, onnx_path: Path, out_dir: Path, options: RunnerOptions) -> Path:
        """Turn the generic lowered ONNX into this backend's variant (static shapes, IR version...).
        Default: use the file as is."""
        return onnx_path

    def runner(self, model_path: Path, options: RunnerOptions) -> Runner:  # pragma: no cover - abstract
        raise NotImplementedError

    def decoder(self, model_path: Path, lowering: dict[str, Any], options: Any, workdir: Path) -> Any:
        """A decoder of its own for causal LMs (a `runtimes.decode.decoders.Decoder`), or None: then
        `runtimes.decode.decoders.open_decoder` runs the in-process decoders on `runner()` (a growing
        cache, or fixed-shape graphs when `dynamic_shapes` is False)."""
        return None

    def check_graph(self, model_path: Path) -> None:
        """Raise a one-line SparsecError when this backend cannot run the lowered graph at `model_path`,
        from what is cheap to read (no weights, no engine): `sparsec serve` asks before binding its port,
        so such an artifact never gets as far as a traceback in the background load. Default: no check."""
        return None

    def dense_configs(self, dense_root: Path, manifest: dict[str, Any]) -> dict[str, Path]:
        """Dense configurations this backend derives itself from the dense reference in `dense_root`
        (label -> what `prepare`/`runner` take), timed beside the compiled model; they replace the generic
        ones of the same label. Default: none (the ONNX files of `dense_alternatives` serve)."""
        return {}

    def info(self) -> dict[str, Any]:
        ok, reason = self.available()
        return {"name": self.name, "device": self.device, "available": ok, "reason": reason, "install": self.install_hint}


def lower_for_backends(registry: Any, backends: tuple[str, ...], root: Path, lowering: dict[str, Any],
                       plan: dict[str, Any], options: dict[str, Any] | None) -> None:
    """Let each requested backend write its own lowered form (`Backend.lower`); one that differs from
    the ONNX lowering's file is recorded in `lowering["backend_files"]`."""
    from compiler.lowering.files import model_file

    for name in backends:
        rel = registry.get_backend(name)().lower(Path(root), lowering, plan, options or {})
        if rel != model_file(lowering, name):
            lowering.setdefault("backend_files", {})[name] = rel
