"""Paired, interleaved, adaptive timing: wall time and CPU time per call, rounds until the interval is tight.

Each round times every configuration once, back to back, in a rotated order (A B C, B C A, ...), so a
change of machine state hits all configurations of a round alike and the per-round ratio cancels it.
Rounds continue past `min_rounds` until the speedup interval of every watched pair is narrower than
`target_width` (relative), or `max_rounds` / `budget_s` is spent — then the stopping reason is recorded.

CPU time: a runner that computes in another process (the DeepSparse worker) exposes `cpu_seconds()`
covering that process; otherwise the harness reads this process's CPU time (all its threads). CPU time
beside wall time shows when a runtime burns cores spinning, or when the machine steals them.

Contention: the timed rounds (not the warm-up) run inside a ContentionMeter
(runtimes/measure/contention.py); its record — other processes' CPU use over the span — travels in
`TimingSeries.contention` and turns a comparison timed on a shared machine into `inconclusive`.

Idle workers: while one configuration is timed (warm-up included), the worker processes of the others are
stopped (`workers`: label -> pid, runtimes/measure/idle_workers.py) — an idle DeepSparse worker spins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from runtimes.measure.contention import ContentionMeter, ContentionRecord
from runtimes.measure.idle_workers import IdleWorkers
from runtimes.measure.speedup import interval_width


@dataclass(frozen=True)
class TimingPlan:
    min_rounds: int = 10
    max_rounds: int = 200
    budget_s: float = 60.0
    target_width: float = 0.10
    warmup: int = 3


@dataclass
class TimingSeries:
    wall_ms: dict[str, list[float]]
    cpu_ms: dict[str, list[float]]
    rounds: int = 0
    seconds: float = 0.0
    stopped: str = ""
    widths: dict[str, float] = field(default_factory=dict)
    contention: ContentionRecord | None = None
    idle_worker_stops: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "seconds": round(self.seconds, 3), "stopped": self.stopped,
                "idle_worker_stops": self.idle_worker_stops,
                "interval_widths": {k: round(v, 4) for k, v in self.widths.items()},
                "contention": self.contention.to_dict() if self.contention else None}


def summary(series: "TimingSeries", label: str) -> dict[str, Any]:
    """Percentiles of one configuration's wall times, its median CPU time, and the raw rounds (for pairing)."""
    from runtimes.measure.stats import percentiles

    cpu = sorted(series.cpu_ms[label])
    return {**percentiles(series.wall_ms[label]), "cpu_p50_ms": cpu[len(cpu) // 2] if cpu else None,
            "rounds_ms": [round(v, 4) for v in series.wall_ms[label]]}


def plan_from(opts: Any) -> TimingPlan:
    """The timing plan of verification options (runs = the minimum number of paired rounds)."""
    return TimingPlan(min_rounds=opts.runs, max_rounds=max(opts.runs, opts.max_rounds), budget_s=opts.time_budget_s,
                      target_width=opts.target_width, warmup=opts.warmup)


def cpu_clocks(owners: dict[str, Any]) -> dict[str, Callable[[], float]]:
    """label -> the CPU clock of what runs that configuration: its `cpu_seconds()` (a worker process),
    else this process's CPU time (all threads)."""
    out = {}
    for label, owner in owners.items():
        clock = getattr(owner, "cpu_seconds", None)
        out[label] = clock if callable(clock) else time.process_time
    return out


def worker_clocks(clocks: dict[str, Callable[[], float]]) -> list[Callable[[], float]]:
    """The distinct CPU clocks of other processes (this process's own clock is always counted)."""
    out: list[Callable[[], float]] = []
    for clock in clocks.values():
        if clock is not time.process_time and clock not in out:
            out.append(clock)
    return out


def paired_timing(calls: dict[str, Callable[[], Any]], plan: TimingPlan,
                  pairs: list[tuple[str, str]] | None = None,
                  cpu_clocks: dict[str, Callable[[], float]] | None = None,
                  threads: int | None = None, workers: dict[str, int] | None = None) -> TimingSeries:
    """Time `calls` in interleaved rounds; `pairs` (baseline, candidate) decide when to stop.
    `threads`: the threads the measured code was asked to use (None: every usable CPU); `workers`: label ->
    pid of the process that runs it (stopped while the others are timed)."""
    names = list(calls)
    clocks = {n: (cpu_clocks or {}).get(n) or time.process_time for n in names}
    series = TimingSeries({n: [] for n in names}, {n: [] for n in names})
    with IdleWorkers(workers or {}) as idle:
        for name in names:
            idle.turn(name)
            for _ in range(plan.warmup):
                calls[name]()
        meter = ContentionMeter(threads, worker_clocks(clocks)).start()
        try:
            _rounds(calls, names, clocks, plan, pairs, series, idle)
        finally:
            series.contention = meter.stop()
        series.idle_worker_stops = idle.stops
    return series


def _rounds(calls: dict[str, Callable[[], Any]], names: list[str], clocks: dict[str, Callable[[], float]],
            plan: TimingPlan, pairs: list[tuple[str, str]] | None, series: TimingSeries, idle: IdleWorkers) -> None:
    start = time.perf_counter()
    while True:
        k = series.rounds % len(names)
        for name in names[k:] + names[:k]:
            idle.turn(name)
            c0, w0 = clocks[name](), time.perf_counter()
            calls[name]()
            w1, c1 = time.perf_counter(), clocks[name]()
            series.wall_ms[name].append((w1 - w0) * 1e3)
            series.cpu_ms[name].append((c1 - c0) * 1e3)
        series.rounds += 1
        series.seconds = time.perf_counter() - start
        if series.rounds < plan.min_rounds:
            continue
        series.widths = {f"{b}/{c}": interval_width(series.wall_ms[b], series.wall_ms[c]) for b, c in (pairs or [])}
        if series.widths and max(series.widths.values()) <= plan.target_width:
            series.stopped = f"interval narrower than {plan.target_width:.0%}"
            break
        if not series.widths:
            series.stopped = "min rounds reached"
            break
        if series.rounds >= plan.max_rounds:
            series.stopped = f"max rounds ({plan.max_rounds})"
            break
        if series.seconds >= plan.budget_s:
            series.stopped = f"time budget ({plan.budget_s:.0f} s)"
            break
