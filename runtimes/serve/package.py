"""`sparsec package`: one self-contained, deployable .tar.gz per artifact.

Layout of the bundle (a single top-level directory, `sparsec-bundle/`):
    artifact/          the verified artifact, byte for byte (its manifest still verifies) — or, for a backend
                       that says what it reads (`Backend.write_bundle_artifact`), that slim copy: the sparsec
                       backend's packed weights without the ONNX graphs and the dense model (runtimes/kernels/slim.py)
    sparsec/           this sparsec's packages (compiler, passes, runtimes: Python files and the C++ kernel
                       sources) and a dist-info carrying its entry points, so backends are found with
                       `PYTHONPATH=sparsec/`; a backend with native code (`Backend.bundle_prepare`) is built by
                       start.sh once its requirements are installed
    requirements.txt   every runtime distribution pinned to the version installed here (transitively),
                       with the PyTorch CPU index for the CPU build of torch
    start.sh           creates a venv on first start (or uses $VENV), then execs `sparsec serve`
    bundle.json        what was packaged: artifact digest, sparsec version, backend, python, created

The file is written to a temp name beside OUT and renamed into place; OUT is never replaced without
`force`.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.artifact import MANIFEST, Artifact, sha256_file
from compiler.errors import ArtifactError

ROOT = "sparsec-bundle"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SERVING_EXTRAS = ("prometheus_client",)  # needed by `serve`, not (yet) a declared sparsec requirement
SPEEDUPS = ("httptools", "uvloop")  # uvicorn's C HTTP parser and event loop: pinned when installed here

START_SH = """#!/usr/bin/env bash
# Start the sparsec server for the bundled artifact.
#   HOST (127.0.0.1)  PORT (8000)  WORKERS (1)  SPARSEC_API_KEY (optional, recommended off loopback)
#   VENV: an existing environment with requirements.txt installed (used as is); default: ./.venv,
#         created and installed on first start.  PYTHON (python3) builds it.
#   SPARSEC_SERVE_ARGS: extra `sparsec serve` flags, e.g. "--max-batch-size 16 --max-wait-ms 1"
#   ./start.sh --install-only   prepares ./.venv and exits (for read-only deployments).
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
if [ -n "${{VENV:-}}" ]; then
  venv="$VENV"
else
  venv="$here/.venv"
  if [ ! -f "$venv/.sparsec-installed" ]; then
    "${{PYTHON:-python3}}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
    touch "$venv/.sparsec-installed"
  fi
fi
export PYTHONPATH="$here/sparsec${{PYTHONPATH:+:$PYTHONPATH}}"
cd "$here"  # `python -m` puts the working directory first on sys.path
{prepare}if [ "${{1:-}}" = "--install-only" ]; then exit 0; fi
# shellcheck disable=SC2086
exec "$venv/bin/python" -m compiler.cli serve "$here/artifact" --backend {backend} --model-name {model_name} \\
  --host "${{HOST:-127.0.0.1}}" --port "${{PORT:-8000}}" --workers "${{WORKERS:-1}}" ${{SPARSEC_SERVE_ARGS:-}} "$@"
"""


@dataclass(frozen=True)
class PackageResult:
    path: Path
    root: str
    sha256: str
    size_bytes: int
    requirements: tuple[str, ...]


def backend_distributions(backend: str, registry: Any = None) -> tuple[str, ...]:
    """The pip distributions a bundle needs for `backend` (its declared `distributions`); a one-line
    error naming the packageable backends when it declares none."""
    if registry is None:
        from compiler.registry import Registry

        registry = Registry.default(kinds=("backend",))
    packageable = [n for n, e in registry.backends.items() if getattr(e.obj, "distributions", ())]
    if backend not in packageable:
        raise ArtifactError(f"cannot package for backend '{backend}' (known: {', '.join(packageable)})")
    return tuple(registry.backends[backend].obj.distributions)


def package_artifact(artifact: str | Path, out: str | Path, backend: str = "onnxruntime",
                     force: bool = False, registry: Any = None) -> PackageResult:
    """Verify ARTIFACT, then write the bundle to OUT atomically."""
    from runtimes.serve.model import find_onnx

    out = Path(out)
    if out.exists() and not force:
        raise ArtifactError(f"output '{out}' already exists: pass --force to replace it")
    if out.exists() and not out.is_file():
        raise ArtifactError(f"output '{out}' exists and is not a file")
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise ArtifactError(f"output '{out}' must end in .tar.gz or .tgz")
    if registry is None:
        from compiler.registry import Registry

        registry = Registry.default(kinds=("backend",))
    distributions = backend_distributions(backend, registry)
    runtime = registry.get_backend(backend)()
    art = Artifact.load(artifact, verify=True)
    find_onnx(art, backend)  # refuse an artifact that was never lowered
    speedups = tuple(d for d in SPEEDUPS if _installed(d))
    requirements = pinned_requirements(distributions + SERVING_EXTRAS + speedups)
    bundle_info = {
        "sparsec": metadata.version("sparsec"), "backend": backend, "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifact": {"name": art.root.resolve().name, "manifest_sha256": sha256_file(art.path(MANIFEST)),
                     "source": art.manifest.get("source", {}).get("model"), "pipeline": art.manifest.get("pipeline")},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    tmp = Path(tmp_name)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.slim-", dir=out.parent))
    try:
        slim = runtime.write_bundle_artifact(art, staging / "artifact")
        bundled = Artifact.load(staging / "artifact", verify=True) if slim is not None else art
        if slim is not None:
            bundle_info["artifact"]["slim"] = {**slim, "manifest_sha256": sha256_file(bundled.path(MANIFEST))}
        prepare = f'"$venv/bin/python" -m {runtime.bundle_prepare}\n' if runtime.bundle_prepare else ""
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
            for path in sorted(bundled.root.rglob("*")):
                if path.is_file():
                    tar.add(path, f"{ROOT}/artifact/{path.relative_to(bundled.root).as_posix()}", recursive=False,
                            filter=_anonymous)
            for source, arcname in sparsec_sources():
                tar.add(source, f"{ROOT}/sparsec/{arcname}", recursive=False, filter=_anonymous)
            _add_text(tar, f"{ROOT}/sparsec/sparsec-{metadata.version('sparsec')}.dist-info/METADATA",
                      f"Metadata-Version: 2.1\nName: sparsec\nVersion: {metadata.version('sparsec')}\n")
            _add_text(tar, f"{ROOT}/sparsec/sparsec-{metadata.version('sparsec')}.dist-info/entry_points.txt",
                      metadata.distribution("sparsec").read_text("entry_points.txt") or "")
            _add_text(tar, f"{ROOT}/requirements.txt", render_requirements(requirements))
            _add_text(tar, f"{ROOT}/start.sh", START_SH.format(backend=backend, model_name=shlex.quote(art.root.resolve().name),
                                                             prepare=prepare), mode=0o755)
            _add_text(tar, f"{ROOT}/bundle.json", json.dumps(bundle_info, indent=2) + "\n")
        if out.exists() and not force:  # appeared while we were writing
            raise ArtifactError(f"output '{out}' already exists: pass --force to replace it")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
        shutil.rmtree(staging, ignore_errors=True)
    return PackageResult(out, ROOT, sha256_file(out), out.stat().st_size, tuple(requirements))


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_text(tar: tarfile.TarFile, name: str, text: str, mode: int = 0o644) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


SOURCE_SUFFIXES = (".py", ".cpp", ".h")  # Python modules and the C++ kernel sources (runtimes/kernels/csrc)


def sparsec_sources() -> list[tuple[Path, str]]:
    """(file, path inside sparsec/) for every source file of sparsec's top-level packages."""
    dist = metadata.distribution("sparsec")
    packages = (dist.read_text("top_level.txt") or "compiler\npasses\nruntimes").split()
    files = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ArtifactError(f"sparsec package '{package}' is not importable here; reinstall sparsec")
        base = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(base.rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                files.append((path, f"{package}/{path.relative_to(base).as_posix()}"))
    return files


def pinned_requirements(extra_roots: tuple[str, ...] = ()) -> list[str]:
    """`name==version` for sparsec's runtime requirements and everything they pull in, as installed here."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    pins: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in extra_roots]
    for req in metadata.distribution("sparsec").requires or []:
        parsed = Requirement(req)
        if parsed.marker is None or parsed.marker.evaluate({**env, "extra": ""}):
            todo.append((parsed.name, frozenset(parsed.extras)))
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (_canonical(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise ArtifactError(f"requirement '{name}' is not installed here; cannot pin it (pip install {name})") from None
        pins[_canonical(dist.metadata["Name"])] = dist.version
        for req in dist.requires or []:
            parsed = Requirement(req)
            wanted = parsed.marker is None or any(parsed.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))
            if wanted:
                todo.append((parsed.name, frozenset(parsed.extras)))
    pins.pop("sparsec", None)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def render_requirements(pins: list[str]) -> str:
    header = ("# Runtime requirements of this bundle, pinned to the versions it was packaged with.\n"
              "# The PyTorch CPU index provides the CPU build of torch (PyPI's default pulls CUDA wheels).\n"
              f"--extra-index-url {TORCH_CPU_INDEX}\n")
    return header + "\n".join(pins) + "\n"


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
