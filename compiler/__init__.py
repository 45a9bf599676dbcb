"""sparsec core: IR, tracing, calibration, pass infrastructure, pipelines, registry, artifacts.

The plugin API is public and stable:

    from compiler import Pass, PassResult, register_pass

The names are imported on first use (PEP 562 `__getattr__`), not when the package is imported: the
server and the deploy bundle import `compiler.*` modules that need no torch, and an ONNX artifact is
served without torch installed (tests/test_layering.py checks it).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# OpenMP threads (torch's pool, which also runs the sparsec kernels) spin ~300k iterations after each
# parallel region by default. On a shared 2-core machine that spinning steals the cores the next op
# needs: a decode step of the tiny Llama on the sparsec backend took 47.8 ms with the default and
# 2.8-7 ms with passive waiting or a 10k spin (load average 6.9; docs/kernels.md). libgomp reads this
# when torch is first imported, so it is set here, before any sparsec module imports torch; a value the
# user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# public name -> the module defining it
_EXPORTS = {
    "SparsecError": "compiler.errors",
    "ModelIR": "compiler.ir",
    "Pass": "compiler.pass_infra", "PassContext": "compiler.pass_infra", "PassResult": "compiler.pass_infra",
    "option": "compiler.pass_infra",
    "Pipeline": "compiler.pipeline", "Recipe": "compiler.pipeline",
    "Registry": "compiler.registry", "register_allocation": "compiler.registry", "register_backend": "compiler.registry",
    "register_pass": "compiler.registry",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from compiler.errors import SparsecError as SparsecError
    from compiler.ir import ModelIR as ModelIR
    from compiler.pass_infra import Pass as Pass
    from compiler.pass_infra import PassContext as PassContext
    from compiler.pass_infra import PassResult as PassResult
    from compiler.pass_infra import option as option
    from compiler.pipeline import Pipeline as Pipeline
    from compiler.pipeline import Recipe as Recipe
    from compiler.registry import Registry as Registry
    from compiler.registry import register_allocation as register_allocation
    from compiler.registry import register_backend as register_backend
    from compiler.registry import register_pass as register_pass


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'compiler' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
