"""`--backend sparsec`: our own sparse CPU kernels (runtimes/kernels/), hosted by torch.

Why torch as the host (docs/kernels.md has the measurements): it is maintained and BSD-licensed, its
wheel ships the headers our C++ ops build against, its thread pool runs our kernels, and the artifact
already holds the transformed Hugging Face model (`model/`), so no export is needed: lowering for this
backend is *packing* — the planned layers written sparse on disk (ART/sparsec/weights.safetensors:
bitmasks + packed non-zeros, int8 with per-channel scales, int4 with group-64 scales, bf16 or fp32), loaded
without ever materialising the dense matrix, and transformers' own KV cache for decode.

Dense baselines on the same engine: the source model as is (torch fp32), with the same layers on our
dense int8 kernel, and (when the plan is int4) on our dense int4 kernel; all need the source model's
Hugging Face directory, which the dense reference keeps for this backend (`needs_source_model`).

`--quantize int4` is declared as the `int4-matmulnbits` form: the scheme is the same (4-bit weights in
groups of 64 along the input dim, int8-class activations at run time), so lowering also writes
onnxruntime's MatMulNBits graph of the same plan beside our packed weights; this backend runs its own
packing of the plan (`lower`), never that graph. `--quantize int8-weight` likewise (declared as
`int8-matmulnbits`): our kernels run it as their int8 form (8-bit weights per output channel,
activations quantized per token — measured on SmolLM2 at +4.4 % perplexity, docs/measurement.md).
`--quantize bf16` is this backend's alone (declared `backend-lowered`: no ONNX variant is written): the
planned layers packed as bf16 values, activations and sums fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

from runtimes.base import Backend, Runner, RunnerOptions

PACKED_DIR = "sparsec"
DENSE_INT8_DIR = "sparsec-dense-int8"
DENSE_FP32_DIR = "sparsec-dense"
DENSE_INT4_DIR = "sparsec-dense-int4"
DENSE_BF16_DIR = "sparsec-dense-bf16"


class SparsecBackend(Backend):
    name = "sparsec"
    install_hint = "built by `make venv` (.venv/bin/python -m runtimes.kernels.build): needs torch and g++"
    needs_source_model: ClassVar[bool] = True
    # bf16: packed bf16 weights, written by `lower` only (compiler.lowering.quant.BACKEND_LOWERED: no ONNX variant)
    quant_forms: ClassVar[Mapping[str, str]] = {"int4": "int4-matmulnbits", "int8-weight": "int8-matmulnbits",
                                                "bf16": "backend-lowered"}
    # a bundle installs the CPU torch and builds the kernels on first start (needs g++ there, like `make venv`)
    distributions: ClassVar[tuple[str, ...]] = ("torch", "ninja")
    bundle_prepare: ClassVar[str | None] = "runtimes.kernels.build"

    def write_bundle_artifact(self, artifact: Any, out_dir: Path) -> dict[str, Any] | None:
        """The slim copy: packed weights, the unpacked tensors, the serving signature (runtimes/kernels/slim.py)."""
        from runtimes.kernels.slim import write_slim_artifact

        res = write_slim_artifact(artifact, out_dir, self.name)
        return {"kept_bytes": res.kept_bytes, "dropped_bytes": res.dropped_bytes, "dropped_tensors": res.dropped_tensors}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            from runtimes.kernels.ops import isa, load

            load()
            return True, f"sparsec kernels ({isa()} path)"
        except ImportError as e:
            return False, f"torch is not installed ({e})"
        except Exception as e:  # noqa: BLE001 - a missing/stale library: its one-line message
            return False, str(e).removeprefix("error: ")

    def lower(self, artifact_dir: Path, lowering: dict[str, Any], plan: dict[str, Any],
              options: dict[str, Any]) -> str:
        from runtimes.kernels.pack import pack_artifact

        pack_artifact(Path(artifact_dir), plan=plan)
        return PACKED_DIR

    def dense_configs(self, dense_root: Path, manifest: dict[str, Any]) -> dict[str, Path]:
        """Dense fp32 (torch), dense int8 (our dense kernel on the plan's layers) and, for an int4 / bf16
        plan, dense int4 / bf16 (our dense kernel of that kind) of the source model."""
        from runtimes.kernels.host_runner import write_dense_host

        model_dir = Path(dense_root) / "model"
        plan = manifest.get("plan") or {}
        layers = sorted(plan.keys())
        configs = {"dense fp32": write_dense_host(Path(dense_root) / DENSE_FP32_DIR, model_dir, "dense", layers),
                   "dense int8 (sparsec kernel)": write_dense_host(Path(dense_root) / DENSE_INT8_DIR, model_dir,
                                                                   "dense-int8", layers)}
        if any((e or {}).get("quant") == "int4" for e in plan.values()):
            configs["dense int4 (sparsec kernel)"] = write_dense_host(Path(dense_root) / DENSE_INT4_DIR, model_dir,
                                                                      "dense-int4", layers)
        if any((e or {}).get("quant") == "bf16" for e in plan.values()):
            configs["dense bf16 (sparsec kernel)"] = write_dense_host(Path(dense_root) / DENSE_BF16_DIR, model_dir,
                                                                      "dense-bf16", layers)
        return configs

    def prepare(self, onnx_path: Path, out_dir: Path, options: RunnerOptions) -> Path:
        """A host directory runs as is; the generic dense ONNX is mapped to the dense model it was lowered from."""
        path = Path(onnx_path)
        if path.is_dir():
            return path
        from compiler.errors import SparsecError
        from runtimes.kernels.host_runner import write_dense_host

        model_dir = path.parent.parent / "model"
        if not (model_dir / "config.json").is_file():
            raise SparsecError(f"the sparsec backend runs Hugging Face models: no model/ beside '{path.parent}'")
        return write_dense_host(Path(out_dir), model_dir, "dense", [])

    def runner(self, model_path: Path, options: RunnerOptions) -> Runner:
        from runtimes.kernels.host_runner import HostRunner

        return HostRunner(Path(model_path), options)

    def decoder(self, model_path: Path, lowering: dict[str, Any], options: Any, workdir: Path) -> Any:
        from runtimes.kernels.host_runner import HostDecoder

        return HostDecoder(self.prepare(Path(model_path), Path(workdir) / "host", RunnerOptions(threads=options.threads)),
                           options.threads, self.name, lean=getattr(options, "cache", "auto") != "dynamic")
