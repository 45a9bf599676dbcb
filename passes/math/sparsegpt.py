"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

Follows the reference `fasterprune`: Hessian H = 2/n·XXᵀ (accumulated by the block runner); dead
input columns (H_jj = 0) get H_jj = 1 and their weights zeroed; dampening `percdamp` × mean(diag H);
the upper Cholesky factor of H⁻¹; columns processed in blocks of `blocksize`; the unstructured mask
is chosen per column block by w² / [H⁻¹]_jj² (adaptive mask selection); each pruned weight's error is
propagated to the not-yet-processed columns of its row. For N:M, the mask of each group of m
consecutive input columns is chosen inside the column loop, when the group's first column is reached
(the reference's behaviour), keeping the n weights with the highest score.

Differences from the reference, deliberate: the unstructured mask prunes exactly round(count × s)
weights per column block (the reference's `<= thresh` keeps one more and over-prunes ties), and a
Cholesky failure is retried with 10× the dampening (up to `max_retries`) instead of crashing; the
dampening actually used is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from passes.math.masks import prune_count


@dataclass(frozen=True)
class SparseGPTResult:
    weight: torch.Tensor
    loss: float  # Σ over rows of the OBS reconstruction loss estimate
    damp: float  # relative dampening finally used
    retries: int
    dead_columns: int


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, max_retries: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp·I)⁻¹; raises dampening ×10 on failure."""
    mean_diag = float(torch.diag(hessian).mean())
    damp = percdamp
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for attempt in range(max_retries + 1):
        h = hessian + (damp * mean_diag) * eye
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp, attempt
        damp *= 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with dampening {damp / 10:g} x mean diag")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> SparseGPTResult:
    """Prune W (out, in) to `sparsity` (or n:m, keeping n of every m input columns) with OBS updates."""
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp, retries = inverse_hessian_factor(H, percdamp)
    keep_n, group_m = nm if nm else (0, 0)
    if nm:  # a group must not straddle two column blocks
        blocksize = max(group_m, blocksize - blocksize % group_m)
    losses = torch.zeros(rows)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if nm:
            Q1, Err1 = _columns_nm(W[:, i1:i2].clone(), Hinv1, keep_n, group_m)
        else:
            Q1, Err1 = _block_unstructured(W[:, i1:i2], Hinv1, sparsity)
        losses += Err1.square().sum(1) / 2
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return SparseGPTResult(W.to(weight.dtype), float(losses.sum()), damp, retries, int(dead.sum()))


def _block_unstructured(W1: torch.Tensor, Hinv1: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One column block, unstructured: (kept weights Q1, scaled errors Err1) — the reference's column loop,
    lean: the mask is fixed at the block's start (w² / [H⁻¹]_jj², the reference's adaptive selection),
    so each column costs one masked scale and one rank-1 update (`addr_`), and the updated block itself
    ends as Q1 (column i's own update turns w_i into q_i; pruned entries are then set to exact zeros). The pruned set is the k smallest scores,
    found by `kthvalue` (ties at the threshold broken by position), not a top-k sort of half the block."""
    W1 = W1.clone()
    d1 = torch.diag(Hinv1)
    score = (W1.square() / d1.unsqueeze(0).square()).flatten()
    k = prune_count(score.numel(), sparsity)
    mask1 = torch.zeros(score.numel(), dtype=torch.bool)
    if k:
        threshold = torch.kthvalue(score, k).values
        mask1 = score < threshold
        ties = torch.nonzero(score == threshold).flatten()[: k - int(mask1.sum())]
        mask1[ties] = True
    scale = mask1.view_as(W1).to(W1.dtype) / d1.unsqueeze(0)  # err_i = w_i · m_i / U_ii
    Err1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        err = W1[:, i] * scale[:, i]
        Err1[:, i] = err
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
    return W1.masked_fill_(mask1.view_as(W1), 0.0), Err1  # w − (w/d)·d is 0 only up to rounding


def _columns_nm(W1: torch.Tensor, Hinv1: torch.Tensor, keep_n: int, group_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One column block, N:M: the reference's column loop (each group's mask is chosen from the weights as
    updated when the group's first column is reached, so the columns cannot be solved at once)."""
    count = W1.shape[1]
    d1 = torch.diag(Hinv1)
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    mask1 = torch.zeros_like(W1, dtype=torch.bool)
    for i in range(count):
        w = W1[:, i]
        d = Hinv1[i, i]
        if i % group_m == 0:
            score = W1[:, i:i + group_m].square() / d1[i:i + group_m].unsqueeze(0).square()
            drop = group_m - keep_n
            mask1.scatter_(1, i + torch.topk(score, drop, dim=1, largest=False).indices, True)
        q = w.clone()
        q[mask1[:, i]] = 0
        Q1[:, i] = q
        err = (w - q) / d
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1
