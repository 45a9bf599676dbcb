"""Calibration data: where text comes from, how it becomes fixed-length token samples, its hash.

Sources: the built-in offline corpus (docstrings of Python's standard library, which exists on
every machine), a text file (paragraphs), a JSONL file (`text` field), a local dataset directory
(`*.txt` / `*.jsonl` files, or a `datasets.save_to_disk` directory when `datasets` is installed),
or `self` (text sampled from the causal LM itself). Samples are random token windows drawn with a
fixed seed; their sha256 goes into the manifest. The sequence length is capped by the model's
`max_position_embeddings` *and* by `MAX_SEQLEN`: it is never the model's maximum by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import random
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiler.errors import CalibrationError

MAX_SEQLEN = 2048
DEFAULT_SAMPLES = 32
DEFAULT_SEQLEN = 128

# Two disjoint sets of standard-library modules: one to calibrate on, one held out for evaluation.
CALIB_MODULES = (
    "abc", "argparse", "asyncio.tasks", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "ipaddress", "itertools", "json", "logging", "pathlib", "pickle", "random", "re",
    "shutil", "socket", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
)
EVAL_MODULES = (
    "unittest.case", "urllib.parse", "uuid", "zipfile", "statistics", "smtplib", "sqlite3",
    "tempfile", "tokenize", "traceback", "types", "weakref", "xml.dom.minidom", "configparser",
    "gettext", "glob", "gzip", "hmac", "imaplib", "locale", "mailbox", "operator", "optparse",
)


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "default"
    samples: int = DEFAULT_SAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise CalibrationError(f"--calib-samples must be > 0, got {self.samples}")
        if self.seqlen <= 1:
            raise CalibrationError(f"--calib-seqlen must be > 1, got {self.seqlen}")


@dataclass
class CalibrationSet:
    """Token samples ready for the model (each a dict of (1, seqlen) tensors) plus provenance."""

    samples: list[dict[str, torch.Tensor]]
    source: str
    seqlen: int
    seed: int
    sha256: str
    notes: list[str] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.samples), "seqlen": self.seqlen,
                "seed": self.seed, "sha256": self.sha256, "notes": list(self.notes)}


# Modules never imported for text: side effects on import, or GUI/test packages.
_NEVER_IMPORT = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
                 "ensurepip", "venv", "pydoc_data"}


def _train_modules() -> tuple[str, ...]:
    """Every importable stdlib module except the held-out evaluation packages (for training LMs)."""
    held_out = {m.split(".")[0] for m in EVAL_MODULES}
    return tuple(sorted(n for n in sys.stdlib_module_names
                        if not n.startswith("_") and n not in _NEVER_IMPORT and n not in held_out))


def stdlib_corpus(split: str = "calib") -> list[str]:
    """Docstrings of standard-library modules in a deterministic order. Splits: `calib` (a fixed
    list), `eval` (a disjoint held-out list), `train` (all other stdlib modules, for training)."""
    names = {"calib": CALIB_MODULES, "eval": EVAL_MODULES}.get(split) or _train_modules()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecated aliases (typing.re ...) warn on attribute access
        return _collect_docstrings(names)


def _foreign(owner: Any) -> bool:
    """Defined by a package outside the standard library (builtin methods have no module: not foreign)."""
    return isinstance(owner, str) and owner.split(".")[0] not in sys.stdlib_module_names


def _source_docstrings(mod: Any) -> dict[str, str | None]:
    """Docstrings of the functions a module's source defines at top level (empty without source)."""
    import ast

    try:
        tree = ast.parse(inspect.getsource(mod))
    except (OSError, TypeError, SyntaxError):
        return {}
    return {n.name: ast.get_docstring(n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _collect_docstrings(names: tuple[str, ...]) -> list[str]:
    texts: list[str] = []
    for mod_name in names:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if mod.__doc__:
            texts.append(inspect.cleandoc(mod.__doc__))
        source_docs: dict[str, str | None] | None = None
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            owner = getattr(obj, "__module__", None)
            if attr.startswith("_"):
                continue
            if owner != mod.__name__:
                # a stdlib function another package replaced at run time (ray patches inspect.isgenerator):
                # its docstring comes from the module's source, so the corpus does not depend on imports
                if callable(obj) and (owner is None or _foreign(owner)):
                    if source_docs is None:
                        source_docs = _source_docstrings(mod)
                    original = source_docs.get(attr)
                    if original and len(original) > 40:
                        texts.append(original)
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                texts.append(doc)
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    member = getattr(obj, meth, None)
                    # methods other packages attach to stdlib classes (transformers adds Logger.warning_once
                    # ...) would make the corpus depend on what the process imported before
                    if meth.startswith("_") or _foreign(getattr(member, "__module__", None)):
                        continue
                    mdoc = inspect.getdoc(member)
                    if mdoc and len(mdoc) > 40:
                        texts.append(mdoc)
    return texts


def load_texts(source: str) -> list[str]:
    """Texts from `default`/`eval` (stdlib corpus), a .txt / .jsonl file, or a dataset directory."""
    if source in ("default", "stdlib"):
        return stdlib_corpus("calib")
    if source in ("eval", "stdlib-eval"):
        return stdlib_corpus("eval")
    path = Path(source)
    if not path.exists():
        raise CalibrationError(f"calibration data '{source}' does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _load_hf_dataset_dir(path)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json") and p.is_file())
        if not files:
            raise CalibrationError(f"calibration directory '{source}' holds no .txt or .jsonl files")
        texts = [t for f in files for t in _load_file(f)]
    else:
        texts = _load_file(path)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration data '{source}' is empty")
    return texts


def _load_file(path: Path) -> list[str]:
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file '{path}' is not UTF-8 text (byte {exc.start})") from None
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"calibration file '{path}' line {lineno}: invalid JSON ({exc.msg})") from None
            text = row.get("text") if isinstance(row, dict) else row if isinstance(row, str) else None
            if not isinstance(text, str):
                raise CalibrationError(f"calibration file '{path}' line {lineno}: no string field 'text'")
            texts.append(text)
        return texts
    return [p.strip() for p in raw.split("\n\n") if p.strip()]


def _load_hf_dataset_dir(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"'{path}' is a Hugging Face dataset directory: pip install datasets to read it") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset '{path}' has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str)]


def effective_seqlen(requested: int, config: Any) -> int:
    limit = MAX_SEQLEN
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            limit = min(limit, value)
    return max(2, min(requested, limit))


def tokenize_windows(texts: list[str], tokenizer: Any, samples: int, seqlen: int, seed: int,
                     source: str) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Concatenate texts, tokenize once, and draw `samples` random windows of `seqlen` tokens."""
    sep = "\n\n"
    ids = tokenizer(sep.join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    notes = []
    if len(ids) < seqlen:
        raise CalibrationError(
            f"calibration data '{source}' has {len(ids)} tokens, fewer than one sample of --calib-seqlen {seqlen}")
    if len(ids) < samples * seqlen:
        notes.append(f"only {len(ids)} tokens for {samples}x{seqlen}: windows overlap")
    rng = random.Random(seed)
    out = []
    for _ in range(samples):
        start = rng.randint(0, len(ids) - seqlen)
        window = torch.tensor(ids[start : start + seqlen], dtype=torch.long).unsqueeze(0)
        out.append({"input_ids": window, "attention_mask": torch.ones_like(window)})
    return out, notes


def self_generated_texts(model: Any, tokenizer: Any, samples: int, seqlen: int, seed: int) -> list[str]:
    """Text sampled from the causal LM itself (self-generated calibration data)."""
    gen = torch.Generator().manual_seed(seed)
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    vocab = len(tokenizer)
    texts = []
    with torch.no_grad():
        for _ in range(samples):
            first = int(torch.randint(0, vocab, (1,), generator=gen))
            ids = torch.tensor([[start_id, first] if start_id is not None else [first]])
            for _ in range(seqlen):
                logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
                probs = torch.softmax(logits, -1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            texts.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return texts


def build_calibration(ir: Any, cfg: CalibrationConfig) -> CalibrationSet:
    """Turn a CalibrationConfig into model-ready samples for `ir`."""
    seqlen = effective_seqlen(cfg.seqlen, ir.config)
    notes = [] if seqlen == cfg.seqlen else [f"seqlen capped from {cfg.seqlen} to {seqlen}"]
    if ir.tokenizer is None:
        if cfg.source not in UNTOKENIZED_SOURCES:
            raise CalibrationError(no_tokenizer_message(cfg.source, ir.source))
        if ir.model_type == "module":
            provided = getattr(ir, "calibration_inputs", None) or [ir.example_inputs]
            samples = [dict(s) for s in provided][: cfg.samples]
            notes.append("model has no tokenizer: calibrating on the factory's example inputs")
            source = "example_inputs"
        else:
            samples = random_token_samples(ir.config, cfg.samples, seqlen, cfg.seed)
            notes.append(f"model has no tokenizer: calibrating on {cfg.samples}x{seqlen} seeded random token ids "
                         "(a weak proxy for text: pass --tokenizer NAME_OR_DIR for real statistics)")
            source = RANDOM_TOKENS
    else:
        if cfg.source == "self":
            if ir.model_type != "causal-lm":
                raise CalibrationError("--calib self needs a causal LM (it samples text from the model)")
            texts = self_generated_texts(ir.module, ir.tokenizer, cfg.samples, seqlen, cfg.seed)
        else:
            texts = load_texts(cfg.source)
        samples, more = tokenize_windows(texts, ir.tokenizer, cfg.samples, seqlen, cfg.seed, cfg.source)
        notes += more
        source = cfg.source
    digest = hashlib.sha256()
    for s in samples:
        for k in sorted(s):
            digest.update(k.encode())
            digest.update(s[k].detach().cpu().contiguous().numpy().tobytes())
    return CalibrationSet(samples, source, seqlen, cfg.seed, digest.hexdigest(), notes)


RANDOM_TOKENS = "random-tokens"
# Sources a model without tokenizer can calibrate on: the default, and the names recorded in a manifest for it.
UNTOKENIZED_SOURCES = ("default", "example_inputs", RANDOM_TOKENS)
# Files that make a Hugging Face directory carry its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "merges.txt")


def no_tokenizer_message(source: str, model: str) -> str:
    return (f"calibration data '{source}' is text, but model '{model}' has no tokenizer to turn it into tokens: "
            "pass --tokenizer NAME_OR_DIR (the model's tokenizer directory or hub id)")


def random_token_samples(config: Any, samples: int, seqlen: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Seeded random token ids over the vocabulary (above its lowest ids, where special tokens sit)."""
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    gen = torch.Generator().manual_seed(seed)
    low = min(16, vocab - 1)
    out = []
    for _ in range(samples):
        ids = torch.randint(low, vocab, (1, seqlen), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def check_text_calibration(model: str, source: str, tokenizer: str | None) -> None:
    """Before the model loads: text calibration (`--calib FILE`, `self`, ...) on a local Hugging Face
    directory that has no tokenizer files, and no `--tokenizer`, is refused (it used to be ignored)."""
    if tokenizer or source in UNTOKENIZED_SOURCES:
        return
    path = Path(model)
    if not (path.is_dir() and (path / "config.json").is_file()) or any(path.glob("*.gguf")):
        return  # built-ins, GGUF, hub ids and factories: checked once loaded
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CalibrationError(no_tokenizer_message(source, model))


def config_dict(cfg: CalibrationConfig) -> dict[str, Any]:
    return asdict(cfg)
