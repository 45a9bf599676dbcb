"""Pass instruments (after TVM's PassInstrument): timing, progress, IR dumps. They live outside the
passes; passes only report progress through `ctx.progress`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from compiler.ir import ModelIR


class Instrument(Protocol):
    def before_pass(self, pass_: Any, ir: ModelIR) -> None: ...
    def after_pass(self, pass_: Any, result: Any, seconds: float) -> None: ...
    def on_progress(self, what: str, done: int, total: int) -> None: ...


@dataclass
class TimingInstrument:
    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = 0.0

    def before_pass(self, pass_, ir):
        self._start = time.perf_counter()

    def after_pass(self, pass_, result, seconds):
        self.seconds[pass_.name] = self.seconds.get(pass_.name, 0.0) + seconds

    def on_progress(self, what, done, total):
        pass


@dataclass
class DumpIRInstrument:
    """Writes `NN-<pass>.json` (structure, plan, analyses) after each pass into `directory`."""

    directory: Path
    _count: int = 0

    def before_pass(self, pass_, ir):
        pass

    def after_pass(self, pass_, result, seconds):
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count += 1
        data = result.ir.summary()
        data["pass"] = pass_.spec()
        data["modified"] = result.modified
        (self.directory / f"{self._count:02d}-{pass_.name}.json").write_text(json.dumps(data, indent=1))

    def on_progress(self, what, done, total):
        pass


class RichProgressInstrument:
    """A rich progress bar over passes and, inside a pass, over blocks. Used only on a terminal."""

    def __init__(self, total_passes: int = 0):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), transient=True)
        self.passes = self.progress.add_task("passes", total=total_passes)
        self.inner = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_pipeline_start(self, pipeline):
        self.progress.update(self.passes, total=len(pipeline.passes))

    def before_pass(self, pass_, ir):
        self.progress.update(self.passes, description=f"pass {pass_.name}")

    def after_pass(self, pass_, result, seconds):
        self.progress.advance(self.passes)
        if self.inner is not None:
            self.progress.remove_task(self.inner)
            self.inner = None

    def on_progress(self, what, done, total):
        if self.inner is None:
            self.inner = self.progress.add_task(what, total=total)
        self.progress.update(self.inner, completed=done, total=total, description=f"  {what}")
