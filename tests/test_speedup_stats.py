"""Speedup intervals and verdicts: coverage on synthetic timings with known noise, and a real CPU hog."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from runtimes.measure.contention import FLOOR_CORES, ContentionMeter, ContentionRecord
from runtimes.measure.machine import record_machine, same_machine
from runtimes.measure.speedup import PROCESS_SPREAD, gate_passes, speedup
from runtimes.measure.timing import TimingPlan, paired_timing, worker_clocks


def _synthetic(rng: np.random.Generator, true_ratio: float, rounds: int, noise: float, drift: bool):
    """Paired rounds: a shared per-round machine factor (drift), independent log-normal noise per call."""
    base = 10.0
    machine = np.exp(rng.normal(0, 0.5, rounds)) if drift else np.ones(rounds)
    b = base * machine * np.exp(rng.normal(0, noise, rounds))
    c = base / true_ratio * machine * np.exp(rng.normal(0, noise, rounds))
    return b, c


def test_interval_covers_true_ratio_at_nominal_rate():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 200
    for _ in range(trials):
        b, c = _synthetic(rng, 2.0, rounds=30, noise=0.05, drift=True)
        est = speedup(b, c, max_relative_width=10)
        hits += est.low <= 2.0 <= est.high
    # 95 % nominal; the percentile bootstrap of a median on 30 rounds under-covers slightly
    assert hits / trials >= 0.88


def test_paired_ratio_cancels_machine_drift():
    rng = np.random.default_rng(2)
    b, c = _synthetic(rng, 1.5, rounds=40, noise=0.02, drift=True)
    est = speedup(b, c)
    # unpaired medians are shifted by the drift; the paired estimate is not
    assert abs(est.median - 1.5) < 0.05
    assert est.verdict == "faster"


def test_no_difference_is_not_faster():
    rng = np.random.default_rng(3)
    b, c = _synthetic(rng, 1.0, rounds=40, noise=0.03, drift=False)
    est = speedup(b, c)
    assert est.verdict == "not faster"
    assert est.low <= 1.0 <= est.high


def test_heavy_noise_is_inconclusive_and_gate_fails():
    rng = np.random.default_rng(4)
    b, c = _synthetic(rng, 2.0, rounds=12, noise=0.8, drift=False)
    est = speedup(b, c, load=3.5)
    assert est.verdict == "inconclusive"
    assert "machine too noisy" in est.reason and "load 3.50" in est.reason
    assert not gate_passes(est, 1.0)


def test_too_few_rounds_is_inconclusive():
    est = speedup([2.0, 2.1], [1.0, 1.0])
    assert est.verdict == "inconclusive"


def test_bad_timings_rejected():
    with pytest.raises(ValueError):
        speedup([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        speedup([1.0, 0.0, 1, 1, 1], [1.0] * 5)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def _work(n: int) -> None:
    a = np.random.default_rng(0).standard_normal((n, n))
    for _ in range(3):
        a = np.tanh(a @ a.T / n)


def test_cpu_hog_never_produces_a_fake_speedup():
    """Two identical workloads timed while hog processes fight for every core: the verdict is
    'inconclusive' or an interval that contains 1 — never a claimed speedup."""
    ctx = mp.get_context("spawn")
    hogs = [ctx.Process(target=_spin, args=(20.0,), daemon=True) for _ in range(max(2, os.cpu_count() or 2))]
    for h in hogs:
        h.start()
    try:
        plan = TimingPlan(min_rounds=10, max_rounds=40, budget_s=8.0, target_width=0.05, warmup=1)
        series = paired_timing({"a": lambda: _work(160), "b": lambda: _work(160)}, plan, pairs=[("a", "b")])
    finally:
        for h in hogs:
            h.terminate()
    est = speedup(series.wall_ms["a"], series.wall_ms["b"], load=os.getloadavg()[0], contention=series.contention)
    assert est.verdict == "inconclusive" or est.low <= 1.0 <= est.high, est
    assert series.rounds >= 10 and series.stopped
    # the hogs are other processes: the contention gate sees them whatever the timings say
    c = series.contention
    assert c is not None and c.available and c.contended and c.foreign_cores > 0.5, c
    assert est.verdict == "inconclusive" and est.reason.startswith("machine busy"), est
    assert not gate_passes(est, 1.0)


def test_contended_record_makes_a_tight_speedup_inconclusive():
    tight_b, tight_c = [10.0, 10.1, 9.9, 10.0, 10.2, 9.8], [5.0, 5.05, 4.95, 5.0, 5.1, 4.9]
    base = dict(available=True, wall_s=5.0, own_cores=1.9, steal_cores=0.0, usable_cpus=2, threads=2,
                limit_cores=FLOOR_CORES, resolution_cores=0.02)
    quiet = ContentionRecord(foreign_cores=0.05, contended=False, **base)
    busy = ContentionRecord(foreign_cores=1.4, contended=True, **base)
    assert speedup(tight_b, tight_c, contention=quiet).verdict == "faster"
    est = speedup(tight_b, tight_c, contention=busy.to_dict())  # as stored in report.json
    assert est.verdict == "inconclusive" and "1.40 of 2 cores" in est.reason and est.median == pytest.approx(2.0)


def test_interval_includes_the_between_process_spread():
    """Five identical rounds give a zero-width bootstrap interval; the reported one still has the
    measured between-process spread (z * PROCESS_SPREAD of the median on each side)."""
    est = speedup([10.0] * 6, [5.0] * 6)
    half = 1.96 * PROCESS_SPREAD * 2.0
    assert est.low == pytest.approx(2.0 - half) and est.high == pytest.approx(2.0 + half)
    assert speedup([10.0] * 6, [5.0] * 6, process_spread=0.0).low == pytest.approx(2.0)


def test_contention_meter_counts_own_threads_and_workers_as_ours():
    """A busy loop in this process is ours, not foreign; a worker's clock joins ours, once."""
    meter = ContentionMeter(threads=1).start()
    _spin(0.6)
    rec = meter.stop()
    assert rec.available and rec.threads == 1 and rec.usable_cpus == len(os.sched_getaffinity(0))
    assert rec.own_cores > 0.5, rec  # the spin ran here (a starved machine still gives it half a core)
    assert rec.limit_cores == max(FLOOR_CORES, rec.usable_cpus - 1)
    worker = lambda: 1.0  # noqa: E731 - a worker process's CPU clock
    assert worker_clocks({"a": time.process_time, "b": worker, "c": worker}) == [worker]


def test_adaptive_rounds_stop_when_tight_and_record_cpu_time():
    plan = TimingPlan(min_rounds=6, max_rounds=100, budget_s=30.0, target_width=1.0, warmup=1)
    series = paired_timing({"slow": lambda: _spin(0.004), "fast": lambda: _spin(0.002)}, plan, pairs=[("slow", "fast")])
    assert 6 <= series.rounds < 100
    assert "interval" in series.stopped
    assert all(c > 0 for c in series.cpu_ms["slow"])
    est = speedup(series.wall_ms["slow"], series.wall_ms["fast"])
    # a conclusive estimate must be near the true 2x; on a loaded machine it may honestly be inconclusive
    assert est.verdict == "inconclusive" or 1.3 < est.median < 3.0, est


def test_machine_record_is_this_machine():
    rec = record_machine(threads=2)
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        text = f.read()
    assert rec.cpu_model in text
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    assert set(rec.isa) <= set(flags)
    assert ("avx512_vnni" in rec.isa) == ("avx512_vnni" in flags)
    assert rec.usable_cpus == len(os.sched_getaffinity(0))
    assert rec.load_before is not None and rec.versions.get("numpy")
    assert same_machine(rec.finish().to_dict())
    assert not same_machine({**rec.to_dict(), "fingerprint": "elsewhere"})
