"""Pass and backend registry.

No global mutable state: `@register_pass` / `@register_backend` / `@register_allocation` only
*mark* a class. A `Registry` is built per run from (1) the entry-point groups `sparsec.passes` /
`sparsec.backends` / `sparsec.allocations` (our built-ins are declared there too, in pyproject.toml),
(2) `--plugin FILE_OR_MODULE` imports, whose marked classes are collected, and (3) explicit `add()`
calls. A name defined twice is an error that names both origins; a plugin that fails to import is an
error carrying the original exception.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from compiler.errors import PluginError, SpecError

Kind = Literal["pass", "backend", "allocation"]
_MARK = "__sparsec_kind__"
GROUPS: dict[str, Kind] = {"sparsec.passes": "pass", "sparsec.backends": "backend",
                           "sparsec.allocations": "allocation"}


def register_pass(cls: type) -> type:
    """Mark a Pass subclass for registration (picked up from plugins and entry points)."""
    from compiler.pass_infra import Pass

    if not (inspect.isclass(cls) and issubclass(cls, Pass)):
        raise TypeError("@register_pass decorates a subclass of compiler.Pass")
    if not cls.name:
        raise TypeError(f"pass class {cls.__qualname__} must set a kebab-case `name`")
    setattr(cls, _MARK, "pass")
    return cls


def register_backend(cls: type) -> type:
    """Mark a Backend class for registration."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"backend class {cls.__qualname__} must set `name`")
    setattr(cls, _MARK, "backend")
    return cls


def register_allocation(cls: type) -> type:
    """Mark an allocation class: `name` plus `allocate(ir, stats, target) -> {layer: ratio}`, a
    candidate that `sparsity-allocation{method=auto}` scores (see passes/allocation_auto.py)."""
    if not (inspect.isclass(cls) and getattr(cls, "name", "") and callable(getattr(cls, "allocate", None))):
        raise TypeError("@register_allocation decorates a class with a `name` and an `allocate(ir, stats, target)` method")
    setattr(cls, _MARK, "allocation")
    return cls


@dataclass
class Entry:
    name: str
    obj: Any
    origin: str


@dataclass
class Registry:
    passes: dict[str, Entry] = field(default_factory=dict)
    backends: dict[str, Entry] = field(default_factory=dict)
    allocations: dict[str, Entry] = field(default_factory=dict)

    @classmethod
    def default(cls, plugins: tuple[str, ...] | list[str] = (), kinds: tuple[Kind, ...] | None = None) -> "Registry":
        """Entry points (of `kinds` only, default all) plus `plugins`. The server asks for backends only:
        importing the passes would import torch, which serving an ONNX artifact does not need."""
        reg = cls()
        reg.load_entry_points(kinds)
        for plugin in plugins:
            reg.load_plugin(plugin)
        return reg

    def _table(self, kind: Kind) -> dict[str, Entry]:
        return {"pass": self.passes, "backend": self.backends, "allocation": self.allocations}[kind]

    def add(self, kind: Kind, obj: Any, origin: str) -> None:
        name = obj.name
        table = self._table(kind)
        if name in table:
            if table[name].obj is obj:
                return
            raise PluginError(f"{kind} '{name}' is defined twice: by {table[name].origin} and by {origin}")
        table[name] = Entry(name, obj, origin)

    def load_entry_points(self, kinds: tuple[Kind, ...] | None = None) -> None:
        for group, kind in GROUPS.items():
            if kinds is not None and kind not in kinds:
                continue
            for ep in metadata.entry_points(group=group):
                dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
                origin = f"entry point {group}:{ep.name} = {ep.value} ({dist})"
                try:
                    obj = ep.load()
                except Exception as exc:  # noqa: BLE001
                    raise PluginError(f"{origin} failed to import: {type(exc).__name__}: {exc}") from exc
                if inspect.ismodule(obj):
                    self._collect(obj, origin)
                else:
                    if getattr(obj, "name", None) != ep.name:
                        raise PluginError(f"{origin}: entry point name '{ep.name}' differs from {kind} name '{getattr(obj, 'name', None)}'")
                    self.add(kind, obj, origin)

    def load_plugin(self, plugin: str) -> None:
        """Import a plugin file (`path/to/file.py`) or module (`pkg.mod`) and register its marked classes."""
        path = Path(plugin)
        origin = f"plugin {plugin}"
        try:
            if plugin.endswith(".py") or path.exists():
                if not path.is_file():
                    raise PluginError(f"plugin file '{plugin}' does not exist")
                mod_name = f"sparsec_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
                spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(plugin)
        except PluginError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything, even SystemExit
            raise PluginError(f"{origin} failed to import: {type(exc).__name__}: {exc}") from exc
        found = self._collect(module, origin)
        if not found:
            raise PluginError(f"{origin} defines no class marked with @register_pass, @register_backend or @register_allocation")

    def _collect(self, module: Any, origin: str) -> int:
        found = 0
        for _, obj in inspect.getmembers(module, inspect.isclass):
            kind = obj.__dict__.get(_MARK)
            if kind and obj.__module__ == module.__name__:
                self.add(kind, obj, origin)
                found += 1
        return found

    def get_pass(self, name: str) -> type:
        if name not in self.passes:
            known = ", ".join(sorted(self.passes)) or "none"
            raise SpecError(f"unknown pass '{name}' (known passes: {known})")
        return self.passes[name].obj

    def get_backend(self, name: str) -> type:
        if name not in self.backends:
            known = ", ".join(sorted(self.backends)) or "none"
            raise SpecError(f"unknown backend '{name}' (known backends: {known})")
        return self.backends[name].obj
