"""The house rules of the import graph (docs/architecture.md, "Packages, wings and the flow").

Every import of our three packages is read from the source (top level and inside functions), so a lazy
import counts like any other. The tests fail on a circle, on an import against the flow, on a private
name taken from another module, and on a backend's name compared as a string outside its own module.
The last test serves an ONNX artifact's modules with torch blocked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compiler", "passes", "runtimes")

# layer -> the layers it may import (its own included). Only the CLI and the compile driver reach runtimes.
ALLOWED = {
    "core": {"core"},
    "lowering": {"core", "lowering"},
    "passes": {"core", "passes"},
    "runtime-core": {"core", "lowering", "runtime-core"},
    "decode": {"core", "lowering", "runtime-core", "decode"},
    "backends": {"core", "lowering", "runtime-core", "decode", "backends"},
    "measure": {"core", "lowering", "runtime-core", "decode", "measure"},
    "serve": {"core", "lowering", "runtime-core", "decode", "serve"},
    "driver": {"core", "lowering", "passes", "runtime-core", "decode", "backends", "measure", "serve", "driver"},
}
RUNTIME_CORE = {"runtimes", "runtimes.base", "runtimes.registry_helpers", "runtimes.venvs", "runtimes.deepsparse_worker"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "compiler":
        if module == "compiler.compile" or (len(parts) == 2 and parts[1].startswith("cli")) or parts[1:2] == ["sweep"]:
            return "driver"
        return "lowering" if len(parts) > 1 and parts[1] == "lowering" else "core"
    if parts[0] == "passes":
        return "passes"
    if parts[0] == "runtimes":
        if module in RUNTIME_CORE:
            return "runtime-core"
        if len(parts) > 1 and parts[1] in ("decode", "measure", "serve"):
            return parts[1]
        if len(parts) > 1 and (parts[1].endswith("_backend") or parts[1] == "kernels"):
            return "backends"  # runtimes/kernels/ is a backend's wing (native kernels and their host)
    return None


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported project module, imported name or '', line) for every import in the file."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := resolve(alias.name)) is not None:
                    out.append((target, "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (absolute imports only)"
            base = node.module or ""
            for alias in node.names:
                sub = resolve(f"{base}.{alias.name}")
                if sub == f"{base}.{alias.name}":
                    out.append((sub, "", node.lineno))  # `from pkg import module`
                elif (target := resolve(base)) is not None:
                    out.append((target, alias.name, node.lineno))
    return out


@pytest.fixture(scope="module")
def graph():
    mods = project_modules()
    edges: dict[str, list[tuple[str, str, int]]] = {}
    for module, path in mods.items():
        if path.name == "deepsparse_loop_server.py":  # runs in the DeepSparse venv; imports its siblings by file
            edges[module] = []
            continue
        edges[module] = [(t, n, line) for t, n, line in imports_of(module, path, mods)
                         if t != module and not module.startswith(t + ".") and t not in PACKAGES]
    return mods, edges


def test_every_module_has_a_layer(graph):
    mods, _ = graph
    unknown = [m for m in mods if m not in PACKAGES and layer_of(m) is None]
    assert not unknown, f"modules outside every layer of the map (docs/architecture.md): {unknown}"


def test_no_import_against_the_flow(graph):
    mods, edges = graph
    bad = []
    for module, targets in edges.items():
        src = layer_of(module)
        for target, _, line in targets:
            dst = layer_of(target)
            if src and dst and dst not in ALLOWED[src]:
                bad.append(f"{mods[module].relative_to(ROOT)}:{line}: {src} '{module}' imports {dst} '{target}'")
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def test_no_import_circle(graph):
    _, edges = graph
    adjacency = defaultdict(set)
    for module, targets in edges.items():
        adjacency[module].update(t for t, _, _ in targets)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adjacency[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_private_name_crosses_modules(graph):
    mods, edges = graph
    bad = [f"{mods[m].relative_to(ROOT)}:{line}: imports '{name}' from {t}"
           for m, targets in edges.items() for t, name, line in targets if name.startswith("_") and not name.startswith("__")]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_no_backend_name_compared_outside_its_module():
    """A backend declares what it runs (runtimes/base.py); nobody else asks `name == "..."`."""
    from compiler.registry import Registry

    backends = {name: entry.obj.__module__ for name, entry in Registry.default(kinds=("backend",)).backends.items()}
    bad = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            consts = [c.value for side in [node.left, *node.comparators] for c in ast.walk(side)
                      if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            for name in set(consts) & set(backends):
                if backends[name] != module:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: compares backend name '{name}'")
    assert not bad, "backend names compared outside their modules:\n" + "\n".join(bad)


NO_TORCH = "import sys; sys.modules['torch'] = None  # `import torch` fails, find_spec('torch') is None\n"


def test_serving_modules_import_without_torch():
    """`sparsec serve` of an ONNX artifact and the deploy bundle's start need no torch: the serving
    modules, every backend module and the backend registry import with torch blocked."""
    code = NO_TORCH + """
import importlib
for name in ("compiler", "compiler.cli", "compiler.cli_serve", "runtimes.serve.app", "runtimes.serve.model",
             "runtimes.serve.package", "runtimes.decode.decoders", "runtimes.decode.deepsparse_decoder",
             "compiler.lowering.rules", "compiler.lowering.files", "compiler.lowering.feeds"):
    importlib.import_module(name)
from compiler.registry import Registry
print(sorted(Registry.default(kinds=("backend",)).backends))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "onnxruntime" in proc.stdout
