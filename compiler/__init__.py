"""sparsec core: IR, tracing, calibration, pass infrastructure, pipelines, registry, artifacts.

The plugin API is public and stable:

    from compiler import Pass, PassResult, register_pass

The names are imported on first use (PEP 562 `__getattr__`), not when the package is imported: the
server and the deploy bundle import `compiler.*` modules that need no torch, and an ONNX artifact is
served without torch installed (tests/test_layering.py checks it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
