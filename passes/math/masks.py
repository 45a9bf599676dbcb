"""Pruning masks from scores. A mask is a bool tensor shaped like W (out, in); True = pruned (zeroed)."""

from __future__ import annotations

import torch


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a `sparsity` target removes (nearest integer)."""
    return min(numel, max(0, int(round(numel * sparsity))))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring weights within each output row (Wanda's comparison group)."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        idx = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring weights of the whole matrix (magnitude pruning's comparison group)."""
    k = prune_count(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring weights in every group of m consecutive input columns."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"in_features {in_f} is not a multiple of m={m}")
    groups = scores.reshape(out_f, in_f // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    if m - n:
        idx = torch.topk(groups, m - n, dim=2, largest=False).indices
        mask.scatter_(2, idx, True)
    return mask.reshape(out_f, in_f)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(mask, 0.0)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of m consecutive input columns holding more than n non-zeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        raise ValueError(f"in_features {in_f} is not a multiple of m={m}")
    nonzero = (weight.reshape(out_f, in_f // m, m) != 0).sum(dim=2)
    return int((nonzero > n).sum())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """(n, m) for an "N:M" plan pattern, None for unstructured / unset."""
    if not pattern or pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if not sep or not n.isdigit() or not m.isdigit() or not 0 < int(n) < int(m):
        raise ValueError(f"pattern must be 'unstructured' or N:M with 0 < N < M, got '{pattern}'")
    return int(n), int(m)
