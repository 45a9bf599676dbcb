"""Importance scores and outlier statistics (Wanda, magnitude, OWL's layerwise outlier distribution)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| — the magnitude-pruning score."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda score |W_ij| · ‖X_j‖₂ for W (out, in) and ‖X_j‖² accumulated over calibration tokens (in,)."""
    if sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"input norms of shape {tuple(sq_norm.shape)} do not match weight {tuple(weight.shape)}")
    return weight.detach().float().abs() * sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


@dataclass(frozen=True)
class ScoreStats:
    """Summary of one layer's scores; `outliers` counts scores above m × (a given) mean."""

    count: int
    total: float
    maximum: float
    sq_total: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return max(self.sq_total / self.count - self.mean ** 2, 0.0) ** 0.5

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "max": self.maximum, "count": self.count}


def score_stats(scores: torch.Tensor) -> ScoreStats:
    s = scores.double()
    return ScoreStats(int(s.numel()), float(s.sum()), float(s.max()) if s.numel() else 0.0, float((s * s).sum()))


def count_above(scores: torch.Tensor, threshold: float) -> int:
    return int((scores > threshold).sum())


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Share of scores strictly above m × mean(scores) (OWL's LOD for one set of scores)."""
    if scores.numel() == 0:
        return 0.0
    return count_above(scores, m * float(scores.double().mean())) / scores.numel()


def pooled_outlier_ratio(score_sets: list[torch.Tensor], m: float) -> float:
    """OWL's block LOD: the outlier ratio of all score sets concatenated, computed without
    concatenating them (the mean is pooled first, then each set is counted against it)."""
    count = sum(s.numel() for s in score_sets)
    if not count:
        return 0.0
    mean = sum(float(s.double().sum()) for s in score_sets) / count
    return sum(count_above(s, m * mean) for s in score_sets) / count
