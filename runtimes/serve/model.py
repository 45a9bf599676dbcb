"""The model behind the server: a verified artifact, its tokenizer, and a backend runner.

`open_artifact` is the cheap, synchronous part (sha256 verification, backend availability, graph
signature, tokenizer) run before the server binds its port, so a tampered or unusable artifact is
refused with a one-line error. `ServedModel.load` builds the runner (embeddings, raw) or the backend's
decoder (completions: the one generation loop of runtimes/decode/loop.py, the same `verify --decode`
measures, on every backend with a decoder — DeepSparse included) and warms it up; the server runs it in
the background and reports ready once it is done.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.artifact import Artifact
from compiler.errors import ArtifactError, SparsecError
from runtimes.decode.decoders import kv_shapes
from runtimes.decode.loop import PAST, GenRequest, GenResult, KVLayout, SamplingParams
from runtimes.serve.text import TextModel, length_buckets, load_text_model, pad_batch, pool

TASK_EMBEDDINGS = "embeddings"
TASK_COMPLETIONS = "completions"
TASK_RAW = "raw"  # only /v1/infer

ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 6: "int32", 7: "int64", 9: "bool", 16: "bfloat16",
               2: "uint8", 3: "int8"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]  # int = static, str = named dynamic axis, None = unnamed dynamic


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def read_signature(onnx_path: Path) -> Signature:
    """Graph inputs/outputs (names, dtypes, shapes) without loading the weights."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for unreadable files
        raise ArtifactError(f"cannot read '{onnx_path}': {type(exc).__name__}: {exc}") from None
    initializers = {i.name for i in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tt = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        return TensorSpec(value.name, ONNX_DTYPES.get(tt.elem_type, f"onnx-type-{tt.elem_type}"), dims)

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    return Signature(inputs, tuple(spec(v) for v in model.graph.output))


def detect_task(sig: Signature, lowering: dict[str, Any]) -> str:
    """embeddings for encoders (feature-extraction), completions for causal LMs, raw otherwise."""
    task = str(lowering.get("task", ""))
    if task == "text-generation" or (not task and "logits" in sig.output_names and "input_ids" in sig.input_names):
        return TASK_COMPLETIONS
    if task == "feature-extraction" or (not task and "last_hidden_state" in sig.output_names):
        return TASK_EMBEDDINGS
    return TASK_RAW


def find_onnx(artifact: Artifact, backend: str) -> Path:
    """The graph `backend` runs: lowering.backend_files[backend] (a quantized variant), else the fp32 model."""
    slim = artifact.manifest.get("slim")
    if isinstance(slim, dict) and slim.get("backend") != backend:
        raise ArtifactError(f"artifact '{artifact.root}' is a slim copy for --backend {slim.get('backend')}: it holds no "
                            f"graph for '{backend}' (package the full artifact for that backend)")
    lowering = artifact.manifest.get("lowering") or {}
    rel = (lowering.get("backend_files") or {}).get(backend) or (lowering.get("files") or {}).get("model") or "onnx/model.onnx"
    path = artifact.path(rel)
    if not path.exists():  # a file (a graph) or a directory (a backend's own lowered form)
        raise ArtifactError(f"artifact '{artifact.root}' has no lowered graph '{rel}': run `sparsec lower {artifact.root} "
                            f"--backend {backend}` (or compile with --backend {backend})")
    return path


@dataclass(frozen=True)
class ServeTarget:
    """Everything checked before binding the port."""

    artifact: Artifact
    backend_name: str
    onnx_path: Path
    signature: Signature
    task: str
    text: TextModel | None
    plugins: tuple[str, ...] = ()

    @property
    def model_id(self) -> str:
        return self.artifact.root.resolve().name


def open_artifact(path: str | Path, backend: str, plugins: tuple[str, ...] = ()) -> ServeTarget:
    """Verify the artifact's sha256 manifest, the backend's availability, and what can be served."""
    from compiler.registry import Registry
    from runtimes.registry_helpers import check_backends_available

    artifact = Artifact.load(path, verify=True)
    registry = Registry.default(plugins, kinds=("backend",))
    check_backends_available(registry, [backend])
    onnx_path = find_onnx(artifact, backend)
    check_graph = getattr(registry.get_backend(backend)(), "check_graph", None)
    if check_graph is not None:  # what the backend cannot run: one line now, not a failed load after binding
        check_graph(onnx_path)
    # a backend that runs its own lowered form (a directory: packed weights) keeps the generic graph's contract
    generic = artifact.path((artifact.manifest.get("lowering") or {}).get("files", {}).get("model", "onnx/model.onnx"))
    sig = read_signature(onnx_path if onnx_path.is_file() else generic)
    task = detect_task(sig, artifact.manifest.get("lowering") or {})
    model_dir = artifact.path("model")
    text = load_text_model(model_dir) if (model_dir / "config.json").is_file() else None
    if task != TASK_RAW and text is None:
        raise ArtifactError(f"artifact '{path}' has no model/ directory with a tokenizer: only /v1/infer could serve it")
    if task == TASK_COMPLETIONS and "logits" not in sig.output_names:
        raise ArtifactError(f"'{onnx_path}' has no 'logits' output: cannot generate text from it")
    if task == TASK_COMPLETIONS:  # every decoder needs the KV-cache lowering
        try:
            kv_shapes(artifact.manifest.get("lowering") or {})
        except SparsecError as exc:
            raise ArtifactError(f"artifact '{path}' cannot serve completions: {exc}; recompile it with --backend") from None
    return ServeTarget(artifact, backend, onnx_path, sig, task, text, tuple(plugins))


def static_shapes(runner: Any, sig: Signature) -> dict[str, tuple[int, ...]] | None:
    """The fixed input shapes of a runner compiled for static shapes (DeepSparse reports them as
    `input_shapes`); None for a runner that takes any batch and sequence length."""
    shapes = getattr(runner, "input_shapes", None)
    if not isinstance(shapes, dict) or not shapes:
        return None
    fixed = {n: tuple(s) for n, s in shapes.items()}
    if not all(isinstance(d, int) and d > 0 for s in fixed.values() for d in s):
        return None
    dynamic = [t.name for t in sig.inputs if any(not isinstance(d, int) for d in t.shape)]
    return fixed if dynamic else None


class ServedModel:
    """A loaded runner plus the task-specific batch functions the batcher calls (in its thread).

    Static-shape runners (compiled for one (batch, seqlen), e.g. DeepSparse) get every batch padded
    to that shape; their sequence length is also the token limit."""

    def __init__(self, target: ServeTarget, runner: Any, workdir: Path | None = None, decoder: Any = None):
        self.target = target
        self.runner = runner  # None for completions: the decoder holds the model
        self.decoder = decoder
        self.workdir = workdir
        lowering = target.artifact.manifest.get("lowering") or {}
        self.static = static_shapes(runner, target.signature) if runner is not None else None
        self.sig = target.signature if self.static is None else Signature(
            tuple(dataclasses.replace(t, shape=self.static.get(t.name, t.shape)) for t in target.signature.inputs),
            target.signature.outputs)
        names = self.sig.output_names
        self.hidden_output = "last_hidden_state" if "last_hidden_state" in names else names[0]
        self.layout = kv_layout(self.sig, lowering.get("kv")) if target.task == TASK_COMPLETIONS else None  # validates

    @classmethod
    def load(cls, target: ServeTarget, threads: int, max_batch_size: int, seqlen: int = 128) -> "ServedModel":
        """Build the backend's runner. A static-shape backend (`dynamic_shapes = False`) first prepares
        its (max_batch_size, seqlen) variant in a private temp directory: nothing in the artifact is
        handed to a runtime that might rewrite it."""
        from compiler.registry import Registry
        from runtimes.base import RunnerOptions

        backend = Registry.default(target.plugins, kinds=("backend",)).get_backend(target.backend_name)()
        if target.text is not None:
            seqlen = min(seqlen, target.text.max_positions)
        if target.task == TASK_COMPLETIONS:
            return cls._load_decoder(target, backend, threads, seqlen)
        options = RunnerOptions(threads=threads, batch_size=max_batch_size, seqlen=seqlen)
        workdir = None
        model_path = target.onnx_path
        if not getattr(backend, "dynamic_shapes", True):
            workdir = Path(tempfile.mkdtemp(prefix="sparsec-serve-"))
            model_path = backend.prepare(target.onnx_path, workdir, options)
        try:
            runner = backend.runner(model_path, options)
            try:
                model = cls(target, runner, workdir)
                model.warmup(max_batch_size)
            except BaseException:
                runner.close()
                raise
        except BaseException:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return model

    @classmethod
    def _load_decoder(cls, target: ServeTarget, backend: Any, threads: int, seqlen: int) -> "ServedModel":
        """The backend's decoder (`open_decoder`). A fixed-shape decoder is compiled for prompts of up to
        `seqlen` tokens and as many new tokens as the model's positions leave (at most `seqlen`)."""
        from runtimes.decode.decoders import DecodeOptions, open_decoder

        lowering = target.artifact.manifest.get("lowering") or {}
        prompt_len = max(1, min(seqlen, target.text.max_positions - 1))
        new_tokens = max(1, min(seqlen, target.text.max_positions - prompt_len))
        workdir = Path(tempfile.mkdtemp(prefix="sparsec-serve-"))
        try:
            decoder = open_decoder(backend, target.onnx_path, lowering,
                                   DecodeOptions(prompt_len=prompt_len, new_tokens=new_tokens, threads=threads), workdir)
            try:
                model = cls(target, None, workdir, decoder)
                model.warmup(1)
            except BaseException:
                decoder.close()
                raise
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return model

    def check_request(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a completion request cannot run on this model's decoder (fixed-shape limits), or None."""
        return self.decoder.check_request(prompt_len, max_tokens) if self.decoder is not None else None

    def max_new_tokens(self, prompt_len: int) -> int:
        """The most tokens a `prompt_len`-token prompt can be continued by (a chat request without a
        budget): what the positions leave, and at most what a fixed-shape decoder was sized for."""
        most = self.token_limit[0] - prompt_len
        opts = getattr(self.decoder, "opts", None)
        if getattr(self.decoder, "cache", "") == "static" and opts is not None:
            most = min(most, opts.new_tokens)
        return max(1, most)

    @property
    def token_limit(self) -> tuple[int, str]:
        """(longest input in tokens, where that limit comes from) for 400 messages."""
        text = self.target.text
        if self.static is not None and "input_ids" in self.static:
            width = self.static["input_ids"][1]
            if width < text.max_positions:
                return width, f"the static sequence length the '{self.target.backend_name}' engine was compiled for"
        return text.max_positions, text.limit_source

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self.decoder is not None:
            self.decoder.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def warmup(self, max_batch_size: int) -> None:
        """One small call and one full-batch call, so the first requests do not pay for allocation."""
        if self.target.task == TASK_EMBEDDINGS:
            for size in (1, min(max_batch_size, self.rows or max_batch_size)):
                self.embed([[self.target.text.pad_id] * 8] * size)
        elif self.target.task == TASK_COMPLETIONS:
            greedy = SamplingParams(max_tokens=2)
            self.generate([GenRequest([self.target.text.eos_ids[0] if self.target.text.eos_ids else 0] * 4, greedy)])

    # -- batch functions -------------------------------------------------------------------------------
    def run_batch(self, key: str, payloads: list[Any]) -> list[Any]:
        if key == TASK_EMBEDDINGS:
            return list(self.embed(payloads))
        if key == TASK_COMPLETIONS:
            return self.generate(payloads)
        if key == TASK_RAW:
            return [self.runner.infer(feeds) for feeds in payloads]
        raise ValueError(f"unknown batch key '{key}'")

    @property
    def rows(self) -> int | None:
        """The static batch size, if any."""
        return self.static["input_ids"][0] if self.static and "input_ids" in self.static else None

    def embed(self, seqs: list[list[int]]) -> np.ndarray:
        """Pooled embeddings, one backend call per group of similar lengths (see length_buckets), or
        per `rows` inputs padded to the static shape."""
        text = self.target.text
        result: np.ndarray | None = None
        if self.static is None:
            groups = length_buckets([len(s) for s in seqs])
        else:
            groups = [list(range(k, min(k + self.rows, len(seqs)))) for k in range(0, len(seqs), self.rows)]
        for group in groups:
            shape = (self.rows, self.static["input_ids"][1]) if self.static else None
            ids, mask = pad_batch([seqs[i] for i in group], text.pad_id, shape=shape)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if self.sig.input("token_type_ids") is not None:
                feeds["token_type_ids"] = np.zeros_like(ids)
            out = self.runner.infer(self._cast(feeds))
            pooled = pool(out[self.hidden_output], mask, text.pooling)[:len(group)]
            if result is None:
                result = np.empty((len(seqs), pooled.shape[1]), dtype=np.float32)
            result[group] = pooled
        return result

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        text = self.target.text
        return self.decoder.complete(requests, text.pad_id, tuple(text.eos_ids))

    def _cast(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, value in feeds.items():
            spec = self.sig.input(name)
            if spec is None:
                continue  # e.g. position_ids for a graph that computes them
            out[name] = value if value.dtype == np.dtype(spec.dtype) else value.astype(spec.dtype)
        return out


def kv_layout(sig: Signature, kv: dict[str, Any] | None = None) -> KVLayout | None:
    """The cache layout of a KV-cache graph (static dims from the graph, else the manifest's `kv`);
    None when the graph takes no past inputs."""
    past = [t for t in sig.inputs if PAST.match(t.name)]
    if not past:
        return None
    kv = kv or {}
    heads, head_dim = {}, {}
    for t in past:
        h = t.shape[1] if len(t.shape) == 4 and isinstance(t.shape[1], int) else kv.get("kv_heads")
        d = t.shape[3] if len(t.shape) == 4 and isinstance(t.shape[3], int) else kv.get("head_dim")
        if not isinstance(h, int) or not isinstance(d, int):
            raise ArtifactError(f"cache input '{t.name}' has shape {t.shape}; expected (batch, heads, past, head_dim) "
                                "with static heads and head_dim (or a 'kv' section in the manifest's lowering)")
        heads[t.name], head_dim[t.name] = h, d
    missing = [n for n in sig.input_names if n not in heads and n not in ("input_ids", "attention_mask", "position_ids")]
    if missing:
        raise ArtifactError(f"the server cannot feed graph inputs {missing}")
    return KVLayout(tuple(t.name for t in past), heads, head_dim, past[0].dtype, sig.input("position_ids") is not None)


def raw_feeds(sig: Signature, inputs: dict[str, Any], vocab_size: int | None) -> dict[str, np.ndarray]:
    """Validate JSON tensors against the graph signature; raises ValueError with a user-facing message."""
    names = sig.input_names
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if unknown or missing:
        parts = ([f"unknown inputs {unknown}"] if unknown else []) + ([f"missing inputs {missing}"] if missing else [])
        raise ValueError(f"{'; '.join(parts)} (the model takes {list(names)})")
    feeds: dict[str, np.ndarray] = {}
    axes: dict[str, tuple[int, str]] = {}
    for spec in sig.inputs:
        try:
            arr = np.asarray(inputs[spec.name], dtype=np.dtype(spec.dtype))
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"input '{spec.name}' must be a rectangular nested list of {spec.dtype} numbers") from None
        if arr.ndim != len(spec.shape):
            raise ValueError(f"input '{spec.name}' has rank {arr.ndim}; the model expects rank {len(spec.shape)} "
                             f"{_shape(spec.shape)}")
        for axis, (dim, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and dim != want:
                raise ValueError(f"input '{spec.name}' has size {dim} on axis {axis}; the model expects {want}")
            if isinstance(want, str):
                seen = axes.setdefault(want, (dim, spec.name))
                if seen[0] != dim:
                    raise ValueError(f"axis '{want}' is {seen[0]} in '{seen[1]}' but {dim} in '{spec.name}'")
        if spec.name == "input_ids" and vocab_size and arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"input_ids must be in [0, {vocab_size}) (the model's vocabulary)")
        feeds[spec.name] = arr
    return feeds


def _shape(shape: tuple[int | str | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"

