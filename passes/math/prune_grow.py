"""Training-free prune-and-grow at constant sparsity (in the spirit of DSnoT, Zhang et al. 2024).

Per output row, the reconstruction error against the dense layer is the quadratic
e(w) = w G_ss wᵀ − 2 w (G_sd w̄) + const (see passes/math/reconstruct.py). A *swap* revives one pruned
weight j at its dense value w̄_j (δ_j = w̄_j) and prunes one kept weight k (δ_k = −w_k); with
g = G_ss w − G_sd w̄ its exact change is
    Δ = 2δ_j g_j + δ_j² G_jj + 2δ_k g_k + δ_k² G_kk + 2δ_jδ_k G_jk.
DSnoT picks the grown and pruned weights by sign and variance heuristics on the mean error; here the
best grow (most negative own term) and then the best prune given that grow are chosen from the exact
quadratic, per row, vectorised over rows, and a swap is kept only when Δ < 0. Rows stop when no swap
helps; every row keeps its number of non-zeros (and N:M layers swap only inside one group of m).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SwapResult:
    weight: torch.Tensor
    swaps: int
    cycles: int


def prune_and_grow(W: torch.Tensor, keep: torch.Tensor, Wd: torch.Tensor, G_ss: torch.Tensor, G_sd: torch.Tensor,
                   max_cycles: int = 50, group: int | None = None) -> SwapResult:
    """Swap pruned/kept weights per row while the exact reconstruction error drops.
    `group`: N:M group size m (swaps stay within one group of m input columns), None = unstructured."""
    w = W.detach().double().clone()
    wd = Wd.detach().double()
    G = G_ss.double()
    keep = keep.clone()
    rows, cols = w.shape
    g = w @ G - wd @ G_sd.double().t()
    diag = torch.diag(G).unsqueeze(0)
    active = torch.ones(rows, dtype=torch.bool)
    ar = torch.arange(rows)
    swaps, cycles = 0, 0
    inf = torch.tensor(float("inf"), dtype=w.dtype)
    for cycles in range(1, max_cycles + 1):
        grow_gain = torch.where(~keep, 2 * wd * g + wd * wd * diag, inf)  # δ_j = w̄_j on pruned j
        grow_gain = torch.where(wd == 0, inf, grow_gain)  # reviving a dense zero changes nothing
        j = grow_gain.argmin(1)
        dj = wd[ar, j]
        # prune cost of each kept k, given the grow of j (includes the cross term)
        dk = -w
        cost = 2 * dk * g + dk * dk * diag + 2 * dj.unsqueeze(1) * dk * G[j]
        allowed = keep.clone()
        if group:
            same = (torch.arange(cols).unsqueeze(0) // group) == (j // group).unsqueeze(1)
            allowed &= same
        cost = torch.where(allowed, cost, inf)
        k = cost.argmin(1)
        delta = grow_gain[ar, j] + cost[ar, k]
        do = active & torch.isfinite(delta) & (delta < -1e-12 * diag.abs().max())
        if not bool(do.any()):
            break
        rsel = ar[do]
        js, ks = j[do], k[do]
        dj_s, dk_s = dj[do], -w[rsel, ks]
        w[rsel, js] = wd[rsel, js]
        w[rsel, ks] = 0.0
        keep[rsel, js] = True
        keep[rsel, ks] = False
        g[rsel] += dj_s.unsqueeze(1) * G[js] + dk_s.unsqueeze(1) * G[ks]
        swaps += int(do.sum())
        active = do
    return SwapResult(w.to(W.dtype), swaps, cycles)
