"""Was the machine shared while we measured? Other processes' CPU time during the timed rounds.

Why: paired rounds cancel drift that hits both sides of a round alike, not contention that slows the
dense and the sparse engine differently. Measured (docs/measurement.md, benchmarks/verify_noise.py):
one MiniLM artifact on DeepSparse read 1.83–1.96× on a quiet 2-core machine, and 1.63× with a *tight*
interval — once 2.35× — beside two busy loops. Nothing in the timings themselves gives that away; what
does is the CPU time that *other* processes spent while ours ran: the machine's busy time from
/proc/stat minus the CPU time of what runs the model (this process, all its threads, plus the worker
processes the runners report through `cpu_seconds()`: the DeepSparse worker). Steal time — a
hypervisor giving our vCPU to another guest — is foreign time too.

The rule: a measurement is *contended* when the foreign work exceeded what the machine had to spare
beyond the threads the measurement asked for — `foreign_cores > max(FLOOR_CORES, usable_cpus − threads)`,
after subtracting the clock-tick resolution (10 ms per reading and process). On 2 cores with 2 threads
any foreign work above a quarter core is contention; on 16 cores a 2-thread measurement tolerates 14
busy cores (memory-bandwidth contention is not caught: documented limit). A contended comparison's
verdict is `inconclusive`, whatever its interval says, and no speed gate passes on it.

Linux only (/proc); elsewhere the record says `available: False` and nothing is gated on it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

# Foreign work below this many cores is background noise (a shell, a log writer): never contention.
FLOOR_CORES = 0.25
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest time is inside user)
_STEAL_FIELD = 7


def _tick() -> float:
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0.01


def machine_busy_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine since boot, of which steal), from /proc/stat's first line."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = _tick()
    busy = sum(fields[i] for i in _BUSY_FIELDS if i < len(fields))
    steal = fields[_STEAL_FIELD] if len(fields) > _STEAL_FIELD else 0
    return busy * tick, steal * tick


@dataclass(frozen=True)
class ContentionRecord:
    """Foreign CPU use over one measurement, in cores (CPU-seconds per wall second)."""

    available: bool
    wall_s: float
    own_cores: float
    foreign_cores: float
    steal_cores: float
    usable_cpus: int
    threads: int
    limit_cores: float
    resolution_cores: float
    contended: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reason(self) -> str:
        return (f"machine busy: other processes used {self.foreign_cores:.2f} of {self.usable_cpus} cores while "
                f"this measurement ran on {self.threads} (allowed {self.limit_cores:.2f})")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ContentionRecord | None":
        return cls(**d) if d else None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class ContentionMeter:
    """Start before the timed rounds, `stop()` after: the ContentionRecord of that span.

    `own_clocks`: CPU clocks of what runs the measured code besides this process (worker processes);
    this process's own CPU time (every thread) is always counted as ours.
    """

    def __init__(self, threads: int | None, own_clocks: list[Callable[[], float]] | None = None):
        self.usable = usable_cpus()
        self.threads = min(threads or self.usable, self.usable)
        self.clocks: list[Callable[[], float]] = [time.process_time, *(own_clocks or [])]
        self._start: tuple[float, float, tuple[float, float] | None] | None = None

    def _own(self) -> float:
        return sum(clock() for clock in self.clocks)

    def start(self) -> "ContentionMeter":
        self._start = (time.perf_counter(), self._own(), machine_busy_seconds())
        return self

    def stop(self) -> ContentionRecord:
        if self._start is None:
            raise RuntimeError("ContentionMeter.stop() before start()")
        w0, own0, busy0 = self._start
        busy1 = machine_busy_seconds()
        wall, own = time.perf_counter() - w0, self._own() - own0
        limit = max(FLOOR_CORES, float(self.usable - self.threads))
        if busy0 is None or busy1 is None or wall <= 0:
            return ContentionRecord(False, wall, own / max(wall, 1e-9), 0.0, 0.0, self.usable, self.threads, limit,
                                    0.0, False)
        foreign = max(0.0, (busy1[0] - busy0[0]) - own) / wall
        steal = max(0.0, busy1[1] - busy0[1]) / wall
        # each reading of /proc/stat and of every clock is quantised to one tick
        resolution = 2 * _tick() * (1 + len(self.clocks)) / wall
        contended = foreign - resolution > limit
        return ContentionRecord(True, round(wall, 4), round(own / wall, 4), round(foreign, 4), round(steal, 4),
                                self.usable, self.threads, limit, round(resolution, 4), contended)
