"""Private virtualenvs for tools whose pins clash with sparsec's own (DeepSparse, optimum-onnx).

DeepSparse 1.8.0 is the last release that installs (1.9.0 is an end-of-life tombstone); it supports
Python ≤ 3.11 and forces onnx<1.15 and numpy<2, which break onnxscript and ORT quantization in our
environment. So it lives in its own venv, created by `sparsec backends install deepsparse`, and runs
in a worker subprocess (runtimes/deepsparse_worker.py).

optimum-onnx 0.1.0 pins transformers<4.58 (sparsec runs on transformers 5): its venv
(`sparsec backends install optimum`) exists to prove that lowered artifacts load in optimum's
`ORTModel*` classes as they are (tests/test_optimum_interop.py); sparsec never imports it.

Location: the spec's `env_var` (`$SPARSEC_DEEPSPARSE_VENV`, `$SPARSEC_OPTIMUM_VENV`), else
`${SPARSEC_HOME:-~/.cache/sparsec}/venvs/NAME`.
A venv counts as installed once its marker file `sparsec-venv.json` exists (written last, after the
import check passed), so an interrupted install never looks usable.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from compiler.errors import SparsecError

MARKER = "sparsec-venv.json"
WORKER_ENV = MappingProxyType({"NM_DISABLE_ANALYTICS": "1", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"})


class VenvError(SparsecError):
    """A backend venv could not be created, or its interpreter is unusable."""


@dataclass(frozen=True)
class VenvSpec:
    name: str
    python: str  # "3.11": the minor version the pinned wheels exist for
    requirements: tuple[str, ...]
    check_module: str
    env_var: str
    licence_notice: str = ""


DEEPSPARSE_LICENCE = (
    "DeepSparse is licensed under the Neural Magic DeepSparse Community License, which permits "
    "evaluation use only (no production deployment without a commercial licence); upstream "
    "development stopped in June 2025."
)

DEEPSPARSE = VenvSpec(
    name="deepsparse",
    python="3.11",
    # Exact pins: 1.9.0 is a tombstone; 1.8.0 needs onnx<1.15 and numpy<2.
    requirements=("deepsparse==1.8.0", "onnx==1.14.1", "numpy==1.26.4"),
    check_module="deepsparse",
    env_var="SPARSEC_DEEPSPARSE_VENV",
    licence_notice=DEEPSPARSE_LICENCE,
)

OPTIMUM = VenvSpec(
    name="optimum",
    python="3.11",
    # optimum-onnx 0.1.0 needs transformers<4.58; torch is the same CPU build as sparsec's (a looser pin
    # pulls the CUDA wheels), onnxruntime the version sparsec's own pin resolves to (same kernels, so
    # the interop test can compare numbers). The test loads artifacts with exactly these versions.
    requirements=("optimum-onnx[onnxruntime]==0.1.0", "optimum==2.1.0", "transformers==4.57.6",
                  "torch==2.13.0", "onnxruntime==1.31.1"),
    check_module="optimum.onnxruntime",
    env_var="SPARSEC_OPTIMUM_VENV",
)

VENVS: Mapping[str, VenvSpec] = MappingProxyType({DEEPSPARSE.name: DEEPSPARSE, OPTIMUM.name: OPTIMUM})


def sparsec_home() -> Path:
    return Path(os.environ.get("SPARSEC_HOME") or Path.home() / ".cache" / "sparsec").expanduser()


def venv_dir(spec: VenvSpec) -> Path:
    override = os.environ.get(spec.env_var)
    return Path(override).expanduser() if override else sparsec_home() / "venvs" / spec.name


def venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for processes run with a backend venv's interpreter (no PYTHONPATH leaking ours)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(WORKER_ENV)
    env.update(extra or {})
    return env


def venv_status(spec: VenvSpec, root: Path | None = None) -> tuple[bool, str]:
    """(usable, reason) for the venv at `root` (default: `venv_dir(spec)`). Cheap: the import probe
    is cached per (interpreter, marker mtime), so a reinstall is noticed."""
    root = root or venv_dir(spec)
    python, marker = venv_python(root), root / MARKER
    if not python.exists():
        return False, f"no {spec.name} venv at {root}"
    if not marker.exists():
        return False, f"{spec.name} venv at {root} is incomplete (no {MARKER}; the install did not finish)"
    stale = _stale(spec, marker)
    if stale:
        return False, stale
    return _probe(str(python), spec.check_module, marker.stat().st_mtime_ns)


def _stale(spec: VenvSpec, marker: Path) -> str | None:
    """Why the venv no longer matches the spec's pins (they changed since it was installed), or None."""
    try:
        installed = json.loads(marker.read_text(encoding="utf-8")).get("requirements")
    except (OSError, ValueError, AttributeError):
        return f"{spec.name} venv marker {marker} is unreadable: reinstall with `sparsec backends install {spec.name} --force`"
    if installed is not None and list(installed) != list(spec.requirements):
        return (f"{spec.name} venv at {marker.parent} has {' '.join(installed)}; sparsec now pins "
                f"{' '.join(spec.requirements)}: reinstall with `sparsec backends install {spec.name} --force`")
    return None


@functools.lru_cache(maxsize=16)
def _probe(python: str, module: str, mtime_ns: int) -> tuple[bool, str]:
    try:
        version = import_version(python, module)
    except VenvError as exc:
        return False, str(exc)
    return True, f"{module} {version} in {Path(python).parent.parent}"


def import_version(python: str, module: str) -> str:
    """`module.__version__` as seen by `python` (raises VenvError when the import fails)."""
    code = f"import {module} as m; print(getattr(m, '__version__', '?'))"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=worker_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VenvError(f"{python} cannot import {module}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise VenvError(f"{python} cannot import {module}: {tail}")
    return proc.stdout.strip().splitlines()[-1]


def python_version(python: str) -> str | None:
    """'3.11' for an interpreter path/command, or None when it does not run."""
    try:
        proc = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def find_python(spec: VenvSpec, explicit: str | None = None) -> str:
    """The interpreter to build the venv with: `explicit`, else python3.X found on PATH."""
    if explicit:
        candidates = [shutil.which(explicit) or explicit]
    else:
        candidates = [p for p in (shutil.which(f"python{spec.python}"), f"/usr/bin/python{spec.python}") if p and Path(p).exists()]
    for cand in candidates:
        version = python_version(cand)
        if version == spec.python:
            return cand
        if explicit:
            found = f"is Python {version}" if version else "does not run"
            raise VenvError(f"--python {explicit} {found}; {spec.name} needs Python {spec.python}")
    raise VenvError(f"{spec.name} needs Python {spec.python} and none was found on PATH "
                    f"(python{spec.python}); install it or pass --python /path/to/python{spec.python}")


def install_venv(spec: VenvSpec, python: str, root: Path | None = None, force: bool = False,
                 log: Callable[[str], None] = lambda line: None, pip_args: tuple[str, ...] = ()) -> Path:
    """Create the venv at `root` (default: `venv_dir(spec)`), pip-install the pins, check the import,
    then write the marker. A failed install removes what it created. Returns the venv root."""
    root = root or venv_dir(spec)
    if (root / MARKER).exists() and not force:
        raise VenvError(f"{spec.name} venv already installed at {root} (use --force to recreate it)")
    if root.exists():
        if not (force or (root / "pyvenv.cfg").exists()):
            raise VenvError(f"{root} exists and is not a venv; remove it or set {spec.env_var}")
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    pip_log = root.parent / f"{root.name}-install.log"
    steps = [
        ("creating venv", [python, "-m", "venv", str(root)]),
        ("upgrading pip", [str(venv_python(root)), "-m", "pip", "install", "--upgrade", "pip", *pip_args]),
        (f"installing {' '.join(spec.requirements)}",
         [str(venv_python(root)), "-m", "pip", "install", *spec.requirements, *pip_args]),
    ]
    try:
        with pip_log.open("w") as fh:
            for title, cmd in steps:
                log(title)
                fh.write(f"$ {' '.join(cmd)}\n")
                fh.flush()
                proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=worker_env())
                if proc.returncode != 0:
                    raise VenvError(f"{title} failed (exit {proc.returncode}): {_tail(pip_log)} — full log: {pip_log}")
        log(f"checking `import {spec.check_module}`")
        version = import_version(str(venv_python(root)), spec.check_module)
        marker = {"name": spec.name, "requirements": list(spec.requirements), "python": python_version(str(venv_python(root))),
                  "base_python": python, "version": version, "created_by": sys.executable}
        (root / MARKER).write_text(json.dumps(marker, indent=2))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _tail(path: Path, lines: int = 3) -> str:
    text = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(text[-lines:]) or "(no output)"
