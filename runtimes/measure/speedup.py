"""Speedup statistics that survive a busy machine: paired rounds, a bootstrap interval, a verdict.

Why paired rounds: the machine drifts (another process starts, the CPU clocks down); within one round
every configuration is timed back to back, so the per-round *ratio* cancels most of that drift, while
the raw per-configuration medians do not. The speedup is the median of the per-round ratios, and its
95 % interval comes from a bootstrap over rounds (resample rounds with replacement; percentile
interval) — no normality assumption, robust to the heavy right tail that stalls produce.

Why a verdict with the word *inconclusive*: three runs of one artifact on a busy machine once gave
1.04×, 5.59× and 7.27×. An interval wider than `max_relative_width` of its own estimate says the
machine, not the model, decided the number; then the verdict is `inconclusive` and no gate passes.
A measurement during which other processes took the cores it needed (runtimes/measure/contention.py)
is `inconclusive` too, however tight its interval: contention can shift the ratio systematically.

Why the interval is widened by PROCESS_SPREAD: the bootstrap only sees round-to-round noise inside one
process. Five quiet verifications of one artifact, each a fresh process (benchmarks/verify_noise.py),
gave medians 1.89, 1.96, 1.84, 1.84, 1.83× — a between-process standard deviation of 2.9 % of the
median, with within-run intervals that did not all overlap (`git show 3fd4da8:benchmarks/results/verify_noise.json`;
the file now holds the run with this widening and the contention gate). That component (memory placement, thread
placement, clocks) cannot be estimated from one run, so the reported interval adds it in quadrature:
half-width = sqrt(bootstrap half-width² + (z · PROCESS_SPREAD · median)²). More rounds shrink only the
bootstrap part; the stopping rule of runtimes/measure/timing.py therefore watches the bootstrap width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from runtimes.measure.contention import ContentionRecord

Verdict = Literal["faster", "not faster", "inconclusive"]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
# An interval wider than this fraction of its estimate is too noisy to support a claim.
MAX_RELATIVE_WIDTH = 0.25
# Below this many paired rounds no interval is trusted.
MIN_ROUNDS = 5
# Between-process relative standard deviation of a speedup (measured: see the module docstring).
PROCESS_SPREAD = 0.03
_Z95 = 1.96


@dataclass(frozen=True)
class SpeedupEstimate:
    """baseline time / candidate time over paired rounds (> 1: the candidate is faster)."""

    median: float
    low: float
    high: float
    rounds: int
    confidence: float
    relative_width: float
    verdict: Verdict
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        return f"{self.median:.2f}× [{self.low:.2f}, {self.high:.2f}] {self.verdict}"


def paired_ratios(baseline: list[float] | np.ndarray, candidate: list[float] | np.ndarray) -> np.ndarray:
    b, c = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if b.shape != c.shape or b.ndim != 1:
        raise ValueError(f"paired rounds need equal 1-D lengths, got {b.shape} and {c.shape}")
    if (b <= 0).any() or (c <= 0).any():
        raise ValueError("timings must be > 0")
    return b / c


def bootstrap_median_interval(values: np.ndarray, confidence: float = CONFIDENCE,
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median (deterministic for a given seed)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    medians = np.median(values[idx], axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(medians, alpha)), float(np.quantile(medians, 1.0 - alpha))


def widen(median: float, low: float, high: float, spread: float = PROCESS_SPREAD) -> tuple[float, float]:
    """The bootstrap interval with the between-process spread added in quadrature on each side."""
    extra = _Z95 * spread * median
    return median - float(np.hypot(median - low, extra)), median + float(np.hypot(high - median, extra))


def speedup(baseline_ms: list[float] | np.ndarray, candidate_ms: list[float] | np.ndarray, *,
            load: float | None = None, max_relative_width: float = MAX_RELATIVE_WIDTH,
            confidence: float = CONFIDENCE, contention: ContentionRecord | dict[str, Any] | None = None,
            process_spread: float = PROCESS_SPREAD) -> SpeedupEstimate:
    """Speedup of candidate over baseline from paired rounds, with its interval and verdict.
    `contention`: the record of the span the rounds were timed in (a contended one is inconclusive)."""
    ratios = paired_ratios(baseline_ms, candidate_ms)
    med = float(np.median(ratios))
    if len(ratios) < MIN_ROUNDS:
        return SpeedupEstimate(med, float("nan"), float("nan"), len(ratios), confidence, float("inf"),
                               "inconclusive", f"only {len(ratios)} paired rounds (need {MIN_ROUNDS})")
    low, high = widen(med, *bootstrap_median_interval(ratios, confidence), spread=process_spread)
    width = (high - low) / med
    record = ContentionRecord.from_dict(contention) if isinstance(contention, dict) else contention
    if record is not None and record.contended:
        return SpeedupEstimate(med, low, high, len(ratios), confidence, width, "inconclusive", record.reason())
    if width > max_relative_width:
        spread = _spread(ratios)
        load_text = f"load {load:.2f}, " if load is not None else ""
        return SpeedupEstimate(med, low, high, len(ratios), confidence, width, "inconclusive",
                               f"machine too noisy: {load_text}spread {spread:.0%} "
                               f"(interval {width:.0%} of the estimate > {max_relative_width:.0%})")
    if low > 1.0:
        verdict: Verdict = "faster"
        reason = f"the whole {confidence:.0%} interval lies above 1"
    else:
        verdict = "not faster"
        reason = f"the {confidence:.0%} interval reaches {low:.2f}, not above 1"
    return SpeedupEstimate(med, low, high, len(ratios), confidence, width, verdict, reason)


def _spread(values: np.ndarray) -> float:
    """Interquartile range relative to the median: how much the rounds disagree."""
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return float((q3 - q1) / np.median(values))


def interval_width(baseline_ms: list[float], candidate_ms: list[float]) -> float:
    """Relative width of the current interval (inf until MIN_ROUNDS rounds exist)."""
    if len(baseline_ms) < MIN_ROUNDS:
        return float("inf")
    ratios = paired_ratios(baseline_ms, candidate_ms)
    low, high = bootstrap_median_interval(ratios, resamples=500)
    return (high - low) / float(np.median(ratios))


def gate_passes(estimate: SpeedupEstimate, min_speedup: float) -> bool:
    """A speed gate passes only on a conclusive measurement whose median clears the bar."""
    return estimate.verdict != "inconclusive" and estimate.median >= min_speedup
