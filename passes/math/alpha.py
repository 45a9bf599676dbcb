"""Heavy-tailed self-regularisation metric of a weight matrix (AlphaPruning, WeightWatcher).

The empirical spectral density (ESD) of the correlation matrix WᵀW — the squared singular values of
W — is fitted with a power law p(λ) ∝ λ^(−α) on its tail λ ≥ λ_min. For each candidate λ_min the
Hill / maximum-likelihood estimate is α = 1 + n / Σ log(λ_i / λ_min) over the n eigenvalues of the
tail; the λ_min whose fit has the smallest Kolmogorov–Smirnov distance to the empirical tail wins
(as WeightWatcher's `alpha` and AlphaPruning's `net_esd_estimator`). Lower α = heavier tail = a
better-trained layer. α is scale-invariant (only ratios λ_i / λ_min enter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    ks_distance: float
    tail: int  # eigenvalues in the fitted tail


def esd(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW (ascending, float64): the squared singular values of W, from the smaller
    Gram matrix (symmetric eigvalsh is ~10x faster than an SVD of W; its non-zero spectrum is the same)."""
    w = weight.detach().double()
    gram = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    return torch.linalg.eigvalsh(gram).clamp_min(0.0)


def fit_power_law(eigs: torch.Tensor, min_tail: int = 2, eps: float = 1e-12) -> PowerLawFit:
    """Hill/MLE alpha with λ_min chosen by the minimal KS distance. `eigs` ascending, positive kept."""
    eigs = eigs.double()
    eigs = eigs[eigs > eps * max(float(eigs.max()), eps)] if eigs.numel() else eigs
    n_all = int(eigs.numel())
    if n_all < min_tail + 1:
        raise ValueError(f"need at least {min_tail + 1} non-zero eigenvalues for a power-law fit, got {n_all}")
    logs = eigs.log()
    # suffix sums of log λ: tail_log[i] = Σ_{j>=i} log λ_j
    tail_log = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])
    best: PowerLawFit | None = None
    for i in range(0, n_all - min_tail + 1):
        n = n_all - i
        denom = float(tail_log[i]) - n * float(logs[i])
        if denom <= 0:
            continue
        alpha = 1.0 + n / denom
        tail = eigs[i:]
        seq = torch.arange(n, dtype=torch.float64) / n
        model_cdf = 1.0 - (tail / eigs[i]).pow(1.0 - alpha)
        d = float((model_cdf - seq).abs().max())
        if best is None or d < best.ks_distance:
            best = PowerLawFit(alpha, float(eigs[i]), d, n)
    if best is None:
        raise ValueError("degenerate spectrum: all eigenvalues equal")
    return best


def layer_alpha(weight: torch.Tensor) -> float:
    """AlphaPruning's per-matrix metric: the power-law alpha of the ESD of WᵀW."""
    return fit_power_law(esd(weight)).alpha
