"""Layer reconstruction with a fixed mask: least squares on calibration Gram matrices.

A layer's sparse weight W (out, in) with kept set K_i per row i should reproduce the dense layer's
outputs: minimise ‖X_s w_i − X_d w̄_i‖² over w_i restricted to K_i, where X_s are the layer's inputs in
the *sparse* model (tokens, in), X_d its inputs in the dense model and w̄ the dense weight. With the
Gram matrices G_ss = X_sᵀX_s, G_sd = X_sᵀX_d, G_dd = X_dᵀX_d this is, per row, the ridge system
(G_ss[K,K] + λ·I) w_K = (G_sd w̄)_K. Rows keep different column sets, so the systems are gathered to
the largest kept count per chunk of rows, padded with identity rows, and solved by batched Cholesky.
Pruned weights stay exactly zero: the mask never changes.
"""

from __future__ import annotations

import torch


def row_errors(W: torch.Tensor, Wd: torch.Tensor, G_ss: torch.Tensor, G_sd: torch.Tensor, G_dd: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per output row: ‖X_s w_i − X_d w̄_i‖², from the Gram matrices (no activations needed).
    float64 by default (the three terms nearly cancel when the error is small); float32 serves for
    the cheap held-out checks that only compare iterates."""
    W, Wd = W.to(dtype), Wd.to(dtype)
    G_ss, G_sd, G_dd = G_ss.to(dtype), G_sd.to(dtype), G_dd.to(dtype)
    return ((W @ G_ss) * W).sum(1) - 2 * ((Wd @ G_sd.t()) * W).sum(1) + ((Wd @ G_dd) * Wd).sum(1)


def dense_energy(Wd: torch.Tensor, G_dd: torch.Tensor) -> torch.Tensor:
    """Per row ‖X_d w̄_i‖²: what relative errors are divided by."""
    Wd = Wd.double()
    return ((Wd @ G_dd.double()) * Wd).sum(1)


def masked_least_squares(W: torch.Tensor, keep: torch.Tensor, Wd: torch.Tensor, G_ss: torch.Tensor, G_sd: torch.Tensor,
                         damp: float, chunk_bytes: int = 256 << 20) -> tuple[torch.Tensor, int]:
    """Solve every row's ridge system on its kept columns; returns (new W, rows whose system failed,
    which keep their current weights). `damp` is relative to the mean diagonal of G_ss."""
    rows, cols = W.shape
    G = G_ss.double()
    lam = damp * float(torch.diag(G).mean().clamp_min(1e-12))
    rhs_all = Wd.double() @ G_sd.double().t()  # (rows, in): (G_sd w̄_i) for every row
    counts = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept columns first
    out = W.detach().clone().double()
    failed = 0
    kmax_all = int(counts.max()) if rows else 0
    step = max(1, chunk_bytes // max(1, 8 * kmax_all * kmax_all))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        kmax = int(counts[r0:r1].max())
        if kmax == 0:
            continue
        idx = order[r0:r1, :kmax]
        valid = torch.arange(kmax).unsqueeze(0) < counts[r0:r1].unsqueeze(1)
        sub = G[idx.unsqueeze(2), idx.unsqueeze(1)]
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        sub = torch.where(both, sub, torch.zeros((), dtype=sub.dtype))
        diag = torch.where(valid, torch.full((), lam, dtype=sub.dtype), torch.ones((), dtype=sub.dtype))
        sub = sub + torch.diag_embed(diag)
        rhs = torch.where(valid, rhs_all[r0:r1].gather(1, idx), torch.zeros((), dtype=sub.dtype))
        chol, info = torch.linalg.cholesky_ex(sub)
        sol = torch.cholesky_solve(rhs.unsqueeze(2), chol).squeeze(2)
        ok = (info == 0) & torch.isfinite(sol).all(1)
        failed += int((~ok).sum())
        new_rows = torch.zeros(r1 - r0, cols, dtype=out.dtype)
        new_rows.scatter_(1, idx, torch.where(valid, sol, torch.zeros((), dtype=sol.dtype)))
        out[r0:r1] = torch.where(ok.unsqueeze(1), new_rows, out[r0:r1])
    out = out.to(W.dtype)
    # keep the mask exact: a kept weight that solved to exactly 0 keeps its previous value
    exact_zero = keep & (out == 0)
    out[exact_zero] = W[exact_zero]
    return out, failed


def masked_cg(W: torch.Tensor, keep: torch.Tensor, Wd: torch.Tensor, G_ss: torch.Tensor, G_sd: torch.Tensor,
              damp: float, iters: int, check_every: int, held_error) -> tuple[torch.Tensor, int, list[float]]:
    """The same ridge systems as `masked_least_squares`, solved by Jacobi-preconditioned conjugate
    gradients for all rows at once (one (rows × in) @ (in × in) product per iteration, in float32),
    warm-started from the current weights. Every `check_every` iterations `held_error(W)` is asked;
    iterating stops when it rises (early stopping is the guard against fitting the calibration
    tokens too closely) and the best iterate is returned with its iteration count and the curve."""
    A = G_ss.float()
    lam = damp * float(torch.diag(A).mean().clamp_min(1e-12))
    A = A + lam * torch.eye(A.shape[0])
    diag = torch.diag(A).clamp_min(1e-12)
    M = keep.float()
    b = (Wd.float() @ G_sd.float().t()) * M
    x = W.detach().float() * M
    r = b - (x @ A) * M
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(1)
    best, best_it = x.clone(), 0
    curve = [float(held_error(x))]
    for it in range(1, iters + 1):
        Ap = (p @ A) * M
        denom = (p * Ap).sum(1)
        alpha = torch.where(denom > 0, rz / denom.clamp_min(1e-30), torch.zeros_like(rz))
        x += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * Ap
        z = r / diag
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
        if it % check_every == 0 or it == iters:
            err = float(held_error(x))
            if err >= curve[-1] and it > check_every:
                curve.append(err)
                break
            curve.append(err)
            if err <= min(curve):
                best, best_it = x.clone(), it
    out = best.to(W.dtype)
    exact_zero = keep & (out == 0)
    out[exact_zero] = W[exact_zero]
    out[~keep] = 0
    return out, best_it, curve
