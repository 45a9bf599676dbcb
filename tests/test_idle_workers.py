"""Idle worker processes are stopped while another configuration is timed (runtimes/measure/idle_workers.py):
real spinning processes, real signals, their state read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from runtimes.measure.idle_workers import IdleWorkers, worker_pids
from runtimes.measure.timing import TimingPlan, paired_timing

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc (Linux)")


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # R running, S sleeping, T stopped


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.fixture
def spinners():
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    time.sleep(0.2)
    yield procs
    for p in procs:
        p.kill()
        p.wait()


@dataclass
class Owner:
    pid: int


def test_worker_pids_keeps_only_other_processes():
    assert worker_pids({"a": Owner(4242), "in-process": object(), "self": Owner(os.getpid()), "none": Owner(0)}) == {"a": 4242}


def test_turn_stops_the_others_and_exit_continues_everyone(spinners):
    a, b = spinners
    with IdleWorkers({"a": a.pid, "b": b.pid}) as idle:
        idle.turn("a")
        assert state(b.pid) == "T" and state(a.pid) != "T"
        before = cpu_ticks(b.pid)
        time.sleep(0.3)
        assert cpu_ticks(b.pid) == before  # a stopped worker burns nothing
        idle.turn("b")
        assert state(a.pid) == "T" and state(b.pid) != "T"
        idle.turn("in-process")  # a configuration without a worker: every worker stops
        assert state(a.pid) == "T" and state(b.pid) == "T"
        assert idle.stops == 3
    assert state(a.pid) != "T" and state(b.pid) != "T"


def test_paired_timing_runs_each_configuration_with_the_others_stopped(spinners):
    a, b = spinners
    seen: dict[str, set[str]] = {"a": set(), "b": set()}

    def call(own, other, label):
        return lambda: seen[label].add(state(other.pid) + state(own.pid).replace("S", "R"))

    series = paired_timing({"a": call(a, b, "a"), "b": call(b, a, "b")}, TimingPlan(min_rounds=3, warmup=1),
                           workers={"a": a.pid, "b": b.pid})
    assert seen == {"a": {"TR"}, "b": {"TR"}}  # the other one stopped, its own running, every call
    assert series.idle_worker_stops > 0 and series.to_dict()["idle_worker_stops"] == series.idle_worker_stops
    assert state(a.pid) != "T" and state(b.pid) != "T"
