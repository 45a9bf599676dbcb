"""Pure math of `sparsity-allocation{method=auto}`: candidate allocations, rank-based masks, fidelity.

Candidates are group allocations (one sparsity per block, or per layer) with the same parameter-
weighted mean `target`, built from the statistics the auto pass collects once:

- `uniform`: every group at `target` (OWL with λ = 0);
- `owl(lam, m)`: OWL's reference formula on the outlier ratios measured with threshold m × mean
  (over the grid, plus OWL's published defaults λ = 0.08, m = 5);
- `alphapruning(lam)`: the ESD power-law alpha of the weights (higher alpha ⇒ sparser);
- `depth-up(lam)` / `depth-down(lam)`: sparsity rising / falling linearly with depth, spread 2λ.

Masks for any target follow from per-layer *ranks* computed once: the rank of a weight's score in its
comparison group (its output row for Wanda, the whole matrix for magnitude). Pruning a fraction r keeps
exactly the weights whose rank is ≥ round(r × group size): the same weights `row_mask` / `layer_mask`
prune, without re-sorting per candidate.

Fidelity is "higher is better": cosine for embeddings / hidden states, −KL(dense ‖ candidate) for
next-token distributions of causal LMs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from passes.math.alpha import fit_power_law
from passes.math.masks import prune_count
from passes.math.owl import Allocation, alpha_allocation, fit_mean, owl_allocation, spread_allocation

FAMILIES = ("owl", "alphapruning", "depth")
OWL_PAPER = (0.08, 5.0)  # OWL's published defaults (λ, M): always a candidate, the reference to beat


@dataclass(frozen=True)
class GroupCandidate:
    """One candidate allocation over groups (blocks or layers), in group order."""

    name: str
    family: str
    params: tuple[tuple[str, float], ...]
    sparsities: tuple[float, ...]
    clamped: int = 0


def candidate_name(family: str, params: tuple[tuple[str, float], ...]) -> str:
    if not params:
        return family
    return f"{family}({','.join(f'{k}={v:g}' for k, v in params)})"


def _candidate(family: str, params: tuple[tuple[str, float], ...], alloc: Allocation) -> GroupCandidate:
    return GroupCandidate(candidate_name(family, params), family, params, alloc.sparsities, alloc.clamped)


def group_candidates(target: float, weights: list[float], grid_lam: tuple[float, ...],
                     lods: dict[float, list[float]] | None = None, alphas: list[float] | None = None,
                     families: tuple[str, ...] = FAMILIES, grid_m: tuple[float, ...] | None = None) -> list[GroupCandidate]:
    """Uniform first, then every family over the λ grid; OWL over `grid_m` (default: the m keys of
    `lods`) and at OWL_PAPER when its m is in `lods`. λ = 0 is uniform for every family: skipped."""
    n = len(weights)
    out = [GroupCandidate("uniform", "uniform", (), tuple([target] * n))]
    lams = [lam for lam in grid_lam if lam > 0]
    if "owl" in families and lods:
        pairs = [(lam, m) for m in (grid_m if grid_m is not None else tuple(lods)) for lam in lams]
        if OWL_PAPER[1] in lods and OWL_PAPER not in pairs:
            pairs.append(OWL_PAPER)
        out += [_candidate("owl", (("lam", lam), ("m", m)), owl_allocation(lods[m], target, lam, weights)) for lam, m in pairs]
    if "alphapruning" in families and alphas is not None:
        out += [_candidate("alphapruning", (("lam", lam),), alpha_allocation(alphas, target, lam, weights)) for lam in lams]
    if "depth" in families and n > 1:
        depth = [float(i) for i in range(n)]
        for lam in lams:
            out.append(_candidate("depth-up", (("lam", lam),), spread_allocation(depth, target, 2 * lam, weights, higher_is_denser=False)))
            out.append(_candidate("depth-down", (("lam", lam),), spread_allocation(depth, target, 2 * lam, weights, higher_is_denser=True)))
    return out


def fit_to_target(values: list[float], weights: list[float], target: float) -> Allocation:
    """Shift (and clamp to [0, 0.99]) arbitrary ratios so their weighted mean is exactly `target`:
    how a plugin's allocation is made comparable with the built-in candidates."""
    return fit_mean(list(values), weights, target)


def allocation_key(sparsities: tuple[float, ...] | list[float], digits: int = 6) -> tuple[float, ...]:
    """Identity of an allocation for de-duplication (candidates that round to the same ratios)."""
    return tuple(round(float(s), digits) for s in sparsities)


def best_index(scores: list[float]) -> int:
    """Index of the highest score; ties go to the earliest candidate (uniform is first)."""
    if not scores:
        raise ValueError("no candidate scores")
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def gram_alpha(weight: torch.Tensor) -> float:
    """AlphaPruning's alpha (as `passes.math.alpha.layer_alpha`), with the ESD taken as the float64
    eigenvalues of the smaller Gram matrix (WᵀW or WWᵀ: the same non-zero spectrum) — about 10× faster
    than float64 singular values on the CPU, equal to ~1e-12 relative on the tail the fit uses."""
    w = weight.detach().double()
    gram = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    return fit_power_law(torch.linalg.eigvalsh(gram).clamp_min(0.0)).alpha


# -- racing: screen every candidate on a few held-out samples, finish the best on the rest ------------
SCREEN_SHARE = 0.25  # of the held-out samples, seen by every candidate
MIN_HELD_TO_SCREEN = 16  # fewer held-out samples: every candidate sees them all (screening on 2 samples misranked)
MIN_SCREEN = 4  # screening samples at least
FINALIST_SHARE = 0.25  # of the distinct candidates go on (at least MIN_FINALISTS), plus uniform
MIN_FINALISTS = 4


EDGE_FACTORS = (1.5, 2.0)  # how far auto extends λ past the grid when the winner sits at its edge
MAX_LAM = 0.5
MAX_EDGE_ROUNDS = 2


def edge_extension(grid_top: float, winner_family: str, winner_lam: float | None) -> tuple[float, ...]:
    """New λ values to try when the winner's λ is the largest of the grid (the optimum may lie outside
    it): `grid_top` × EDGE_FACTORS, below MAX_LAM. Empty when the winner is inside the grid or uniform."""
    if winner_family == "uniform" or winner_lam is None or grid_top <= 0 or winner_lam < grid_top - 1e-12:
        return ()
    return tuple(v for v in (round(grid_top * f, 6) for f in EDGE_FACTORS) if grid_top < v < MAX_LAM)


def standard_error(values: torch.Tensor) -> float:
    """Standard error of a mean score over held-out rows (samples or tokens): the score spread that
    says whether two candidates' scores differ by more than noise."""
    n = values.numel()
    return float(values.float().std() / n ** 0.5) if n > 1 else float("nan")


def screen_size(held: int) -> int:
    """Held-out samples in the screening round (0 = no screening: score everyone on everything)."""
    return max(MIN_SCREEN, round(held * SCREEN_SHARE)) if held >= MIN_HELD_TO_SCREEN else 0


def finalist_count(candidates: int) -> int:
    return max(MIN_FINALISTS, math.ceil(candidates * FINALIST_SHARE))


def finalists(screen_scores: list[float], count: int) -> list[int]:
    """Indices (ascending) of the `count` best screening scores, plus index 0 (uniform) always."""
    order = sorted(range(len(screen_scores)), key=lambda i: (-screen_scores[i], i))
    return sorted(set(order[:count]) | {0})


# -- rank-based masks ----------------------------------------------------------------------------
def _rank_dtype(size: int) -> torch.dtype:
    return torch.int16 if size <= torch.iinfo(torch.int16).max else torch.int32


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each score within its output row (0 = lowest), as a compact integer tensor."""
    order = scores.argsort(dim=1, stable=True)
    dtype = _rank_dtype(scores.shape[1])
    ranks = torch.empty(scores.shape, dtype=dtype)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], dtype=dtype).expand_as(order).contiguous())
    return ranks


def flat_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each score within the whole matrix (0 = lowest)."""
    order = scores.flatten().argsort(stable=True)
    ranks = torch.empty(order.numel(), dtype=torch.int32)
    ranks[order] = torch.arange(order.numel(), dtype=torch.int32)
    return ranks.view(scores.shape)


def keep_mask(ranks: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """True where a weight survives pruning to `sparsity` (rows: Wanda's groups; else the whole matrix)."""
    size = ranks.shape[1] if per_row else ranks.numel()
    return ranks >= prune_count(size, sparsity)


# -- fidelity ------------------------------------------------------------------------------------
def token_kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ candidate) per token, for log-probabilities `ref_logp` and raw `logits` (…, vocab)."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1)


def pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention-masked mean over the sequence: (batch, seq, hidden) -> (batch, hidden)."""
    if mask is None:
        return hidden.float().mean(1)
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of matching rows of two (batch, …) tensors, flattened per row."""
    return F.cosine_similarity(a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float(), dim=-1)
