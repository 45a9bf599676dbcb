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


class LogProgressInstrument:
    """Plain progress lines on a stream (stderr when it is not a terminal: CI logs, `2> log`, pipes), so a
    long compile is never silent: `[   12.3s] pass 2/3 prune`, `[   40.1s] prune: 3/30` (blocks done,
    for the block-wise passes; steps for the others).
    Within a pass a line is written for the first and last step and at most every `interval` seconds. Nothing is
    written during the first `quiet_for` seconds of the first pipeline run: a compile whose passes end (or
    fail on their input) by then stays as terse as before, and its one-line error stays one line, however
    long the imports and the model load took. The stamps count from the start of the compile."""

    def __init__(self, stream: Any, interval: float = 10.0, quiet_for: float = 10.0):
        self.stream = stream
        self.interval = interval
        self.quiet_for = quiet_for
        self.started = time.perf_counter()
        self.count = 0
        self.total = 0
        self._last_line = 0.0
        self._speak_from: float | None = None  # set when the first pipeline starts

    def line(self, text: str) -> None:
        if self._speak_from is None or time.perf_counter() < self._speak_from:
            return
        self.stream.write(f"[{time.perf_counter() - self.started:8.1f}s] {text}\n")
        self.stream.flush()
        self._last_line = time.perf_counter()

    def on_pipeline_start(self, pipeline: Any) -> None:
        self.count, self.total = 0, len(pipeline.passes)
        if self._speak_from is None:
            self._speak_from = time.perf_counter() + self.quiet_for

    def before_pass(self, pass_: Any, ir: ModelIR) -> None:
        self.count += 1
        self.line(f"pass {self.count}/{self.total} {pass_.name}")

    def after_pass(self, pass_: Any, result: Any, seconds: float) -> None:
        self.line(f"pass {pass_.name} done in {seconds:.1f}s")

    def on_progress(self, what: str, done: int, total: int) -> None:
        if done <= 1 or done >= total or time.perf_counter() - self._last_line >= self.interval:
            self.line(f"{what}: {done}/{total}")
