"""`--backend sparsec`: our own sparse CPU kernels (runtimes/kernels/), hosted by torch.

Why torch as the host (docs/kernels.md has the measurements): it is maintained and BSD-licensed, its
wheel ships the headers our C++ ops build against, its thread pool runs our kernels, and the artifact
already holds the transformed Hugging Face model (`model/`), so no export is needed: lowering for this
backend is *packing* — the planned layers written sparse on disk (ART/sparsec/weights.safetensors:
bitmasks + packed non-zeros, int8 with per-channel scales or fp32), loaded without ever materialising
the dense matrix, and transformers' own KV cache for decode.

Dense baselines on the same engine: the source model as is (torch fp32) and with the same layers on our
dense int8 kernel; both need the source model's Hugging Face directory, which the dense reference keeps
for this backend (`needs_source_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from runtimes.base import Backend, Runner, RunnerOptions

PACKED_DIR = "sparsec"
DENSE_INT8_DIR = "sparsec-dense-int8"
DENSE_FP32_DIR = "sparsec-dense"


class SparsecBackend(Backend):
    name = "sparsec"
    install_hint = "built by `make venv` (.venv/bin/python -m runtimes.kernels.build): needs torch and g++"
    needs_source_model: ClassVar[bool] = True

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
        """Dense fp32 (torch) and dense int8 (our dense kernel on the plan's layers) of the source model."""
        from runtimes.kernels.host_runner import write_dense_host

        model_dir = Path(dense_root) / "model"
        layers = sorted((manifest.get("plan") or {}).keys())
        return {"dense fp32": write_dense_host(Path(dense_root) / DENSE_FP32_DIR, model_dir, "dense", layers),
                "dense int8 (sparsec kernel)": write_dense_host(Path(dense_root) / DENSE_INT8_DIR, model_dir,
                                                                "dense-int8", layers)}

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
                           options.threads, self.name)
