"""The sweep's grid: axes (sparsity × method × allocation) and the settings every cell shares.

Everything here is checked before Ray starts, so a typo costs a one-line error (exit 2), not a cluster
start-up. A cell's configuration is its axes plus the shared settings; `settings_digest` names the
shared part, so a resumed sweep reuses a finished cell only when it was computed with the same
settings (a cell computed with other settings is recomputed, never mixed into the table).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from compiler.errors import SparsecError


class SweepArgumentError(SparsecError):
    """A grid value is malformed or out of range (exit 2, like click's usage errors)."""

    exit_code = 2


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    sparsity: float
    method: str
    allocation: str

    @property
    def key(self) -> str:
        """Directory name under SWEEP_DIR/cells, e.g. "wanda-uniform-s50" (s = sparsity in percent)."""
        return f"{self.method}-{self.allocation}-s{round(100 * self.sparsity, 2):g}"

    def shorthand(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "method": self.method, "allocation": self.allocation}


@dataclass(frozen=True)
class SweepSettings:
    """What every cell shares: the model, the compile settings outside the axes, and how it is measured."""

    model: str
    backends: tuple[str, ...] = ("onnxruntime",)
    quantize: str | None = None
    recover: str | None = None
    pattern: str | None = None
    calib: str = "default"
    calib_samples: int = 32
    calib_seqlen: int = 128
    seed: int = 0
    eval_data: str = "eval"
    batch_size: int = 1
    seqlen: int = 128
    threads: int = 1
    runs: int = 20
    plugins: tuple[str, ...] = ()

    def verify_options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seqlen": self.seqlen, "threads": self.threads, "runs": self.runs,
                "min_speedup": None, "max_accuracy_drop": None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSettings":
        return cls(**{**data, "backends": tuple(data["backends"]), "plugins": tuple(data.get("plugins") or ())})

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepGrid:
    settings: SweepSettings
    sparsities: tuple[float, ...]
    methods: tuple[str, ...]
    allocations: tuple[str, ...]
    cells: tuple[Cell, ...] = field(init=False)

    def __post_init__(self) -> None:
        cells = tuple(Cell(s, m, a) for m in self.methods for a in self.allocations for s in self.sparsities)
        object.__setattr__(self, "cells", cells)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "settings_digest": self.settings.digest,
                "axes": {"sparsity": list(self.sparsities), "method": list(self.methods), "allocation": list(self.allocations)},
                "cells": [c.key for c in self.cells]}


def split_list(text: str, option: str) -> tuple[str, ...]:
    """"a, b,a" -> ("a", "b"): order kept, duplicates dropped; an empty list is an error."""
    items = tuple(dict.fromkeys(x.strip() for x in (text or "").split(",") if x.strip()))
    if not items:
        raise SweepArgumentError(f"{option}: give at least one value (comma-separated), got '{text}'")
    return items


def parse_sparsities(text: str) -> tuple[float, ...]:
    out = []
    for item in split_list(text, "--sparsity"):
        try:
            value = float(item)
        except ValueError:
            raise SweepArgumentError(f"--sparsity: '{item}' is not a number (e.g. 0.5,0.6,0.7)") from None
        if not 0.0 < value < 1.0:
            raise SweepArgumentError(f"--sparsity: {item} is outside (0, 1)")
        out.append(value)
    return tuple(dict.fromkeys(out))


def check_axes(methods: tuple[str, ...], allocations: tuple[str, ...], settings: SweepSettings) -> None:
    """Every method and allocation must build the shorthand pipeline (the registry's own option checks:
    the same values `sparsec compile --method/--allocation` accepts, plugins included)."""
    from compiler.compile import shorthand_spec
    from compiler.errors import SpecError
    from compiler.pipeline import Pipeline
    from compiler.registry import Registry

    registry = Registry.default(settings.plugins)
    base: dict[str, Any] = {"quantize": settings.quantize, "recover": settings.recover, "pattern": settings.pattern}
    axes: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = (
        ("--method", methods, {"allocation": "uniform"}), ("--allocation", allocations, {"method": "wanda"}))
    for option, values, other in axes:
        for value in values:
            kwargs: dict[str, Any] = {**base, **other, option[2:]: value}
            try:
                Pipeline.from_spec(shorthand_spec(**kwargs), registry)
            except SpecError as exc:
                raise SweepArgumentError(f"{option} {value}: {exc.one_line()}") from None


def build_grid(settings: SweepSettings, sparsity: str, method: str, allocation: str) -> SweepGrid:
    """Parse and check the axes (no model is loaded, Ray is not started)."""
    for key in ("calib_samples", "batch_size", "seqlen", "threads", "runs"):
        if getattr(settings, key) <= 0:
            raise SweepArgumentError(f"--{key.replace('_', '-')} must be > 0, got {getattr(settings, key)}")
    if settings.calib_seqlen <= 1:
        raise SweepArgumentError(f"--calib-seqlen must be > 1, got {settings.calib_seqlen}")
    if not settings.backends:
        raise SweepArgumentError("--backend: a sweep measures speed, give at least one backend (e.g. onnxruntime)")
    grid = SweepGrid(settings, parse_sparsities(sparsity), split_list(method, "--method"), split_list(allocation, "--allocation"))
    check_axes(grid.methods, grid.allocations, settings)
    return grid
