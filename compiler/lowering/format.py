"""The lowered graph's format bounds, its error type and its loader, in one place (torch-free: the runtimes
read them when they rewrite or reject a file, and serving an ONNX artifact needs no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compiler.errors import SparsecError

OPSET = 17  # declared default-domain opset of every lowered graph (compiler/lowering/export.py says why 17)
MAX_IR_VERSION = 9  # DeepSparse loads ONNX IR <= 9: every lowered file keeps to it


class LoweringError(SparsecError):
    """The model cannot be lowered to ONNX, or the lowered graph breaks one of our rules."""


def load_onnx(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)
