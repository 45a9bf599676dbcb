"""Backend availability checks shared by `compile --backend`, `verify`, `bench` and `serve`."""

from __future__ import annotations

from compiler.errors import BackendUnavailable
from compiler.registry import Registry


def check_backends_available(registry: Registry, names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        backend = registry.get_backend(name)
        ok, reason = backend.available()
        if not ok:
            hint = f"; install: {backend.install_hint}" if backend.install_hint else ""
            raise BackendUnavailable(f"backend '{name}' is not available: {reason}{hint}")
