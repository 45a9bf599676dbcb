"""transformers' KV-cache calling convention, in one place (the decode paths, lowering's export
wrapper, the greedy-agreement metric).

transformers 5.x renamed a decoder's `past_key_values` argument and output field to `cache` (a
`transformers.Cache`, e.g. `DynamicCache`). The old names still work until 5.40, but each call logs
"`past_key_values` is deprecated and will be removed in version 5.40.0 ... Use `cache` instead" (a
FutureWarning) and reading `out.past_key_values` logs "`past_key_values`/`cache_params` are
deprecated". These helpers pass and read the name the model's own `forward` declares, so the same code
runs on the 5.x versions pyproject allows without either message (tests/test_cache_api.py).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@functools.lru_cache(maxsize=64)
def _kwarg_for(forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters  # follows the deprecation wrapper's __wrapped__
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return OLD_NAME
    return NEW_NAME if NEW_NAME in params else OLD_NAME


def cache_kwarg(module: Any) -> str:
    """`cache` when the model's forward takes it (5.24 does), else `past_key_values`."""
    return _kwarg_for(type(module).forward)


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` to splat into `module(...)`."""
    return {cache_kwarg(module): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, read under the field name its output class declares."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return getattr(out, NEW_NAME if NEW_NAME in fields else OLD_NAME, None)
