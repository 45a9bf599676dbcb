"""Stop the worker processes of the configurations that are not being timed (SIGSTOP / SIGCONT).

Why: a runtime that computes in its own process keeps its thread pool spinning between calls. Measured on
the 2-core machine (1.1B decode, `benchmarks/decode_vs_genai.py --threads 2`): each idle DeepSparse
worker used 40–110 % of a core while the other configurations of the round ran, so whichever configuration
needs both cores lost part of one to a process that had nothing to do — and the contention meter cannot flag
it, because a configuration's own worker is "ours". Paired rounds only cancel disturbances that hit every
configuration alike; this one hits every configuration except the spinner's own.

So each configuration's turn starts by stopping every other configuration's worker (SIGSTOP: the process
keeps its memory, its pipes and its compiled engine, and uses no CPU) and continuing its own (SIGCONT);
leaving the block continues every worker. A worker is stopped only between calls, never inside one (the
parent is then waiting for nothing from it). Where the OS has no SIGSTOP (Windows) nothing is stopped.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

STOP_WAIT_S = 0.05  # how long a turn waits for a stopped worker to show as stopped (signals arrive asynchronously)


def worker_pids(owners: dict[str, Any]) -> dict[str, int]:
    """label -> the pid of the worker process that runs it (an owner's `pid`: the DeepSparse runner and
    decoder); configurations that compute in this process are left out."""
    out: dict[str, int] = {}
    for label, owner in owners.items():
        pid = getattr(owner, "pid", None)
        if isinstance(pid, int) and pid > 0 and pid != os.getpid():
            out[label] = pid
    return out


class IdleWorkers:
    """`with IdleWorkers(pids) as idle: idle.turn(label); time label` — see the module docstring."""

    def __init__(self, pids: dict[str, int]):
        self.pids = dict(pids)
        self.enabled = hasattr(signal, "SIGSTOP") and bool(self.pids)
        self.stopped: set[int] = set()
        self.stops = 0  # how many times a worker was stopped (recorded beside the timings)

    def turn(self, label: str) -> None:
        """Before timing `label`: its own worker runs, every other configuration's worker is stopped."""
        if not self.enabled:
            return
        own = self.pids.get(label)
        if own is not None:
            self._signal(own, signal.SIGCONT)
            self.stopped.discard(own)
        newly = [pid for pid in set(self.pids.values()) - {own} - self.stopped if self._signal(pid, signal.SIGSTOP)]
        self.stopped.update(newly)
        self.stops += len(newly)
        _await_stopped(newly)

    def resume_all(self) -> None:
        for pid in list(self.stopped):
            self._signal(pid, signal.SIGCONT)
        self.stopped.clear()

    @staticmethod
    def _signal(pid: int, sig: int) -> bool:
        try:
            os.kill(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):  # gone: its next request reports that, not us
            return False

    def __enter__(self) -> "IdleWorkers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume_all()


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (T: stopped), None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _await_stopped(pids: list[int]) -> None:
    """Return once every pid shows as stopped (or after STOP_WAIT_S): kill() returns before the signal is
    delivered, and the timed call must not start beside a worker still on a core."""
    deadline = time.perf_counter() + STOP_WAIT_S
    pending = list(pids)
    while pending and time.perf_counter() < deadline:
        pending = [pid for pid in pending if _process_state(pid) not in (None, "T", "t", "Z", "X")]
        if pending:
            time.sleep(0.0005)
