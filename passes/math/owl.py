"""Layerwise sparsity allocation: spread a global target S over groups (blocks or layers) by a score.

OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"), reference formula: per group the
layerwise outlier distribution LOD_i is normalised to [0, 2λ] by min/max; density_i = LOD_i −
mean(LOD) + (1 − S); sparsity_i = 1 − density_i. More outliers ⇒ lower sparsity.

AlphaPruning (Lu et al. 2024) uses the same linear map with the opposite sign: the heavy-tail metric
alpha_i normalised to [0, 2ε]; higher alpha ⇒ higher sparsity.

Generalisations, both reducing to the reference when they do not apply:
- groups of different parameter counts: the shift is the *parameter-weighted* mean, so the
  weighted mean sparsity is exactly S (with equal weights it is the plain mean of the reference);
- bounds: ratios must lie in [0, hi] (hi = max(0.99, S), a layer is never fully removed). When the
  linear map leaves that range (S near 0 or 1, or a large λ), ratios are clamped and the common shift
  is re-solved (by bisection) so the weighted mean is still exactly S — "clamp and redistribute".
  The order of groups is preserved; only the spread shrinks. The number of clamped groups is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LAYER_SPARSITY = 0.99


@dataclass(frozen=True)
class Allocation:
    sparsities: tuple[float, ...]
    clamped: int  # groups that hit a bound (0 = the plain linear map)
    mean: float  # achieved weighted mean sparsity


def normalise(scores: list[float], spread: float) -> list[float]:
    """Min/max normalise to [0, spread]; all-equal scores map to 0 (a uniform allocation)."""
    lo, hi = min(scores), max(scores)
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo), 1.0):
        return [0.0] * len(scores)
    return [(s - lo) / (hi - lo) * spread for s in scores]


def weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def fit_mean(offsets: list[float], weights: list[float], target: float, lo: float = 0.0, hi: float | None = None) -> Allocation:
    """Sparsities `clip(offset_i + c, lo, hi)` with the common shift c chosen so the weighted mean is
    `target`. Closed form when nothing is clamped, bisection otherwise."""
    hi = max(MAX_LAYER_SPARSITY, target) if hi is None else hi
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside [{lo}, {hi}]")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    c = target - weighted_mean(offsets, weights)
    values = [o + c for o in offsets]
    if all(lo <= v <= hi for v in values):
        return Allocation(tuple(values), 0, weighted_mean(values, weights))

    def mean_at(shift: float) -> float:
        return weighted_mean([min(max(o + shift, lo), hi) for o in offsets], weights)

    a, b = lo - max(offsets), hi - min(offsets)  # mean_at(a) = lo <= target <= hi = mean_at(b)
    for _ in range(200):
        mid = (a + b) / 2
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    values = [min(max(o + b, lo), hi) for o in offsets]
    clamped = sum(1 for v in values if v <= lo or v >= hi)
    return Allocation(tuple(values), clamped, weighted_mean(values, weights))


def spread_allocation(scores: list[float], target: float, spread: float, weights: list[float] | None = None,
                      higher_is_denser: bool = True) -> Allocation:
    """Map scores linearly onto sparsities spanning `spread` around `target` (weighted mean = target)."""
    if not scores:
        return Allocation((), 0, target)
    weights = list(weights) if weights is not None else [1.0] * len(scores)
    if len(weights) != len(scores):
        raise ValueError("one weight per score")
    norm = normalise(list(scores), spread)
    offsets = [-v for v in norm] if higher_is_denser else norm
    return fit_mean(offsets, weights, target)


def owl_allocation(lods: list[float], target: float, lam: float, weights: list[float] | None = None) -> Allocation:
    """OWL: more outliers (higher LOD) ⇒ lower sparsity; spread 2λ; weighted mean = target."""
    return spread_allocation(lods, target, 2 * lam, weights, higher_is_denser=True)


def alpha_allocation(alphas: list[float], target: float, eps: float, weights: list[float] | None = None) -> Allocation:
    """AlphaPruning: higher alpha (less well-trained) ⇒ higher sparsity; spread 2ε; weighted mean = target."""
    return spread_allocation(alphas, target, 2 * eps, weights, higher_is_denser=False)
