"""sparsec core: IR, tracing, calibration, pass infrastructure, pipelines, registry, artifacts.

The plugin API is public and stable:

    from compiler import Pass, PassResult, register_pass
"""

__version__ = "0.1.0"

from compiler.errors import SparsecError  # noqa: E402
from compiler.ir import ModelIR  # noqa: E402
from compiler.pass_infra import Pass, PassContext, PassResult, option  # noqa: E402
from compiler.pipeline import Pipeline, Recipe  # noqa: E402
from compiler.registry import Registry, register_allocation, register_backend, register_pass  # noqa: E402

__all__ = [
    "ModelIR", "Pass", "PassContext", "PassResult", "Pipeline", "Recipe", "Registry",
    "SparsecError", "option", "register_allocation", "register_backend", "register_pass", "__version__",
]
