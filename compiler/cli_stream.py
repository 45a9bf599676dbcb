"""The streaming option group shared by `sparsec compile` and `sparsec eval` (docs/streaming.md)."""

from __future__ import annotations

from typing import Any, Callable

import click


def stream_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds `--stream/--no-stream` (stream, default None = automatic) and `--max-memory SIZE` (max_memory)."""
    fn = click.option("--max-memory", metavar="SIZE",
                      help="Resident memory the run may use, e.g. 8GiB: chooses streaming when the model would not fit, "
                           "and sizes the chunks of calibration samples per block call.")(fn)
    return click.option("--stream/--no-stream", default=None,
                        help="Stream blocks from disk one at a time (default: only when the model would not fit in memory).")(fn)


def max_memory_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    from compiler.streaming.memory import parse_size

    return parse_size(text)
