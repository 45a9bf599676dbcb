"""The artifact directory: written atomically, versioned, verified by sha256.

Layout (see README "Artifact layout"):
    manifest.json   public keys: schema_version, source, pipeline, calibration, plan, analyses, files
    report.json     per-pass metrics/time, evaluation, per-backend verification (public shape)
    report.md       the same for humans
    plots/          outlier_ratio.png, sparsity.png, ...
    model/          the transformed model as a loadable Hugging Face directory (or safetensors)
    onnx/           lowered graphs, per backend variant

Writing happens in a sibling temp directory that is renamed into place on success; an existing
OUT is never replaced without `force`, and a failure or Ctrl-C leaves OUT untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = sha256_file(p)
    return out


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class ArtifactWriter:
    """Context manager: `with ArtifactWriter(out, force) as w: ...write under w.root...; w.commit(manifest)`."""

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.root: Path | None = None
        self.committed = False

    def check_destination(self) -> None:
        """Refuse OUT before any work: it exists (without force), or nothing can be created where it goes
        (under a file, a read-only or virtual filesystem). The probe really creates and removes a
        directory in the nearest existing ancestor: permission bits say nothing when running as root."""
        if self.out.exists() and not self.force:
            raise ArtifactError(f"output '{self.out}' already exists: pass --force to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise ArtifactError(f"output '{self.out}' exists and is not a directory")
        check_writable_location(self.out)

    def __enter__(self) -> "ArtifactWriter":
        self.check_destination()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        except OSError as exc:
            raise write_error(self.out, exc) from exc
        return self

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Hash every file, write manifest.json, and rename the temp dir into place."""
        assert self.root is not None
        manifest = dict(manifest)
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["files"] = hash_files(self.root)
        write_json(self.root / MANIFEST, manifest)
        self.check_destination()
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.root, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        if exc is not None and is_io_error(exc):
            raise write_error(self.out, exc) from exc


def is_io_error(exc: BaseException) -> bool:
    """An OSError (disk full, file too large, permission, read-only filesystem) or safetensors' own
    wrapper of one (its Rust writer raises `SafetensorError`, not OSError)."""
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def write_error(out: Path, exc: BaseException) -> ArtifactError:
    detail = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ArtifactError(f"cannot write artifact '{out}': {detail}; nothing was written")


def check_writable_location(out: Path) -> None:
    """Raise ArtifactError unless a directory can be created where `out` goes (probed, then removed)."""
    out = Path(os.path.abspath(out))
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArtifactError(f"output '{out}' is under '{ancestor}', which is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor))
    except OSError as exc:
        raise ArtifactError(f"output '{out}' cannot be written: {exc.strerror or exc} in '{ancestor}'") from None


@dataclass
class Artifact:
    """A compiled artifact read back from disk."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Artifact":
        root = Path(path)
        if not root.is_dir():
            raise ArtifactError(f"artifact '{path}' does not exist or is not a directory")
        mf = root / MANIFEST
        if not mf.is_file():
            raise ArtifactError(f"'{path}' is not a sparsec artifact: no {MANIFEST}")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"'{mf}' is not valid JSON: {exc}") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"artifact '{path}' has schema_version {version!r}; this sparsec reads {SCHEMA_VERSION}")
        art = cls(root, manifest)
        if verify:
            art.verify_files()
        return art

    def verify_files(self) -> None:
        """Raise ArtifactError naming the first file that is missing or whose sha256 differs."""
        for rel, digest in sorted(self.manifest.get("files", {}).items()):
            p = self.root / rel
            if not p.is_file():
                raise ArtifactError(f"artifact '{self.root}': file '{rel}' listed in the manifest is missing")
            if sha256_file(p) != digest:
                raise ArtifactError(f"artifact '{self.root}': sha256 mismatch for '{rel}' (file was modified or corrupted)")

    @property
    def slim(self) -> dict[str, Any] | None:
        """The slim record of an artifact bundled for one backend (runtimes/kernels/slim.py), else None."""
        value = self.manifest.get("slim")
        return value if isinstance(value, dict) else None

    def require_full(self, action: str) -> None:
        """A one-line ArtifactError when this is a slim artifact: it holds neither the other backends' graphs
        nor the dense model that `action` needs."""
        if self.slim:
            raise ArtifactError(f"artifact '{self.root}' is a slim copy for --backend {self.slim.get('backend')} "
                                f"(a deploy bundle's): {action} needs the full artifact it was packaged from")

    @property
    def report(self) -> dict[str, Any]:
        p = self.root / REPORT_JSON
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    def path(self, rel: str) -> Path:
        return self.root / rel

    def update(self, files: dict[str, Any] | None = None, manifest_updates: dict[str, Any] | None = None) -> None:
        """Rewrite JSON files inside an existing artifact (e.g. a new report from `sparsec verify`)
        and refresh the manifest hashes. Each file is written to a temp name and renamed."""
        for rel, data in (files or {}).items():
            target = self.root / rel
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            write_json(tmp, data)
            os.replace(tmp, target)
        manifest = dict(self.manifest)
        manifest.update(manifest_updates or {})
        manifest["files"] = hash_files(self.root)
        tmp = self.root / f".{MANIFEST}.tmp-{os.getpid()}"
        write_json(tmp, manifest)
        os.replace(tmp, self.root / MANIFEST)
        self.manifest = manifest
