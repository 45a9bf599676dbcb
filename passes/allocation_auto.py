"""`sparsity-allocation{method=auto}`: pick the layerwise allocation by held-out fidelity.

Whether OWL helps depends on the model: on LLaMA-scale models with strong activation outliers it
does; on the pretrained MiniLM it is worse than uniform at every sparsity. Auto measures instead of
guessing (design and measurements: docs/auto-allocation.md):

1. The calibration set is split: the last `holdout` share of samples (≥ 1) is held out for scoring,
   the rest gives the statistics. With a single sample, both use it (reported in diagnostics).
2. One batched forward pass of the *dense* model over the statistics part, with hooks on every
   prunable layer inside the blocks, gives each layer's ‖X_j‖² (Wanda's norms) — the same numbers
   outlier-analysis computes. From them, once: OWL outlier ratios for every m of `grid_m` and 5 (per block
   and per layer), and the rank of each weight's score in its comparison group (Wanda: its output
   row; magnitude: the whole matrix; sparsegpt is ranked with the Wanda proxy).
3. The dense model's outputs on the held-out samples are cached once (log-probabilities for causal
   LMs, mean-pooled last hidden states otherwise).
4. Candidates (passes/math/candidates.py): uniform, OWL over grid_lam × grid_m and at its published
   defaults (λ=0.08, m=5), AlphaPruning and linear depth ramps over grid_lam, and every allocation a
   plugin registers (`@register_allocation` or the `sparsec.allocations` entry-point group).
   Identical allocations are scored once.
5. Each candidate is scored by running the held-out samples through the model with its masks applied
   temporarily (a forward pre-hook swaps each layer's weight for the masked copy and a post-hook puts
   the original back, so at most one masked layer exists at a time and the weights are never
   changed): fidelity = mean cosine with the dense outputs, or −KL(dense ‖ candidate) per token for
   causal LMs. The best score wins; ties go to uniform, which is always the first candidate — so on
   the held-out data auto is never worse than uniform *under these masks*.

The masks are one-shot masks from dense statistics; the `prune` pass that follows prunes block by
block with the statistics of the already-pruned blocks (and SparseGPT reconstructs weights), so the
scores rank allocations, they are not the final quality. Every candidate, its score and the time
spent go to metrics and to `ir.analyses["allocation_candidates"]` (the manifest, `sparsec inspect`
and the plot `plots/allocation.png`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from compiler.block_runner import LayerStats, check_weights_finite
from compiler.errors import NumericsError, PluginError, SpecError
from compiler.ir import ModelIR, weight_matrix
from compiler.pass_infra import PassContext
from compiler.stats import first_tensor, input_matrix
from compiler.trace import call_model
from passes.math.candidates import (
    FAMILIES,
    MAX_EDGE_ROUNDS,
    OWL_PAPER,
    GroupCandidate,
    allocation_key,
    best_index,
    edge_extension,
    finalist_count,
    finalists,
    fit_to_target,
    flat_ranks,
    gram_alpha,
    group_candidates,
    keep_mask,
    pooled,
    row_cosines,
    row_ranks,
    screen_size,
    standard_error,
    token_kl,
)
from passes.math.masks import nm_mask, parse_pattern
from passes.math.scores import magnitude_scores, outlier_ratio, pooled_outlier_ratio, wanda_scores
from passes.plan_utils import layer_groups

BATCH = 8  # samples per batched forward (memory: one batch's activations)


@dataclass(frozen=True)
class AutoSettings:
    target: float
    granularity: str
    prune_method: str
    holdout: float
    grid_lam: tuple[float, ...]
    grid_m: tuple[float, ...]
    families: tuple[str, ...]


def validate_settings(s: AutoSettings) -> None:
    """One-line SpecErrors for the auto options (called when the pass is constructed)."""
    where = "sparsity-allocation method=auto"
    if not 0.0 < s.holdout < 1.0:
        raise SpecError(f"{where}: holdout must be in (0, 1), got {s.holdout}")
    bad = [lam for lam in s.grid_lam if not 0.0 <= lam < 0.5]
    if bad:
        raise SpecError(f"{where}: grid_lam values must be in [0, 0.5), got {bad[0]}")
    bad = [m for m in s.grid_m if not m > 0]
    if bad or not s.grid_m:
        raise SpecError(f"{where}: grid_m needs values > 0, got {bad[0] if bad else 'none'}")
    unknown = [f for f in s.families if f not in FAMILIES]
    if unknown:
        raise SpecError(f"{where}: unknown candidate family '{unknown[0]}' (known: {', '.join(FAMILIES)})")


@dataclass(frozen=True)
class AllocationStats:
    """What an allocation plugin's `allocate(ir, stats, target)` receives (read-only).

    `layers`: the layers to allocate (execution order); `sq_norm[layer]`: Wanda's ‖X_j‖² over
    `tokens` calibration tokens (dense model); `block_outlier_ratio[m][block]` and
    `outlier_ratio[m][layer]`: OWL's outlier ratios for each m of `grid_m` and m = 5."""

    layers: tuple[str, ...]
    sq_norm: Mapping[str, torch.Tensor]
    tokens: int
    block_outlier_ratio: Mapping[float, Mapping[int, float]]
    outlier_ratio: Mapping[float, Mapping[str, float]]
    prune_method: str


@dataclass
class Candidate:
    name: str
    family: str
    params: dict[str, float]
    ratios: dict[str, float]
    clamped: int = 0
    score: float | None = None  # mean fidelity on all held-out samples (finalists only)
    screen_score: float | None = None  # on the screening samples (when the held-out part was split)
    screened_out: bool = False
    seconds: float = 0.0
    duplicate_of: str | None = None


@dataclass
class HeldOut:
    """Held-out inputs and the dense model's outputs on them (cached once)."""

    kind: str  # "kl" (causal LM logits) | "cosine"
    batches: list[dict[str, torch.Tensor]]
    outputs: list[torch.Tensor] = field(default_factory=list)


# -- data ----------------------------------------------------------------------------------------
def split_holdout(samples: list[dict[str, torch.Tensor]], share: float) -> tuple[list, list]:
    """(statistics part, held-out part): the last round(share × n) samples, at least 1, are held out."""
    n = len(samples)
    if n < 2:
        return list(samples), list(samples)
    k = min(n - 1, max(1, round(n * share)))
    return list(samples[: n - k]), list(samples[n - k:])


def batches(samples: list[dict[str, torch.Tensor]], size: int = BATCH) -> Iterator[dict[str, torch.Tensor]]:
    """Samples concatenated along the batch axis when they all share keys and (1, …) shapes."""
    first = samples[0]
    stackable = all(set(s) == set(first) and all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1
                                                  and v.shape == first[k].shape for k, v in s.items()) for s in samples)
    if not stackable:
        yield from samples
        return
    for i in range(0, len(samples), size):
        chunk = samples[i : i + size]
        yield {k: torch.cat([s[k] for s in chunk]) for k in first}


def collect_input_norms(ir: ModelIR, samples: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, LayerStats]:
    """‖X_j‖² of every named layer's input over all tokens of `samples`, dense model, batched."""
    stats = {n: LayerStats(sq_norm=torch.zeros(ir.layers[n].in_features, dtype=torch.float32)) for n in names}
    handles = []
    for name in names:
        def hook(m: nn.Module, inp: tuple, _out: Any, name: str = name) -> None:
            xm = input_matrix(ir.layers[name], m, inp[0].detach().float())
            stats[name].sq_norm += (xm * xm).sum(0)
            stats[name].tokens += xm.shape[0]

        handles.append(ir.get_module(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches(samples):
                call_model(ir.module, batch)
    finally:
        for h in handles:
            h.remove()
    bad = [n for n, st in stats.items() if not torch.isfinite(st.sq_norm).all()]
    if bad:
        raise NumericsError(f"NaN/Inf in the calibration activations entering layer '{bad[0]}'")
    return stats


def _pooled_output(out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's first output, mean-pooled over the attention mask when it is (batch, seq, hidden)."""
    t = first_tensor(out)
    mask = batch.get("attention_mask")
    if t.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
        return pooled(t, mask)
    return t.float()


def _model_output(ir: ModelIR, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = call_model(ir.module, batch)
    return out.logits if kind == "kl" else _pooled_output(out, batch)


def dense_reference(ir: ModelIR, samples: list[dict[str, torch.Tensor]]) -> HeldOut:
    """The dense model's held-out outputs: log-probabilities (causal LMs with logits) or pooled states."""
    ref = HeldOut("cosine", list(batches(samples)))
    for i, batch in enumerate(ref.batches):
        with torch.no_grad():
            out = call_model(ir.module, batch)
        if i == 0 and ir.model_type == "causal-lm" and getattr(out, "logits", None) is not None:
            ref.kind = "kl"
        ref.outputs.append(torch.log_softmax(out.logits.float(), dim=-1) if ref.kind == "kl" else _pooled_output(out, batch))
    return ref


# -- masks ---------------------------------------------------------------------------------------
@contextmanager
def temporary_masks(ir: ModelIR, keep: Mapping[str, Callable[[], torch.Tensor]]) -> Iterator[None]:
    """While active, each named layer computes with `weight × keep()`: a pre-hook swaps in a masked
    copy, a post-hook restores the original tensor (also on errors). The weights never change. The
    copies share one scratch buffer (the largest layer's size): a layer's masked weight only lives
    during its own call."""
    originals: dict[str, torch.Tensor] = {}
    scratch: dict[torch.dtype, torch.Tensor] = {}
    for name in keep:
        w = ir.get_module(name).weight
        if w.numel() > scratch.get(w.dtype, torch.empty(0)).numel():
            scratch[w.dtype] = torch.empty(w.numel(), dtype=w.dtype)
    handles = []

    def restore(name: str) -> None:
        if name in originals:
            ir.get_module(name).weight.data = originals.pop(name)

    for name, make_keep in keep.items():
        kind = ir.layers[name].kind

        def pre(m: nn.Module, _args: tuple, name: str = name, kind: str = kind, make_keep: Callable = make_keep) -> None:
            original = m.weight.data
            matrix = weight_matrix(m, kind)
            masked = torch.mul(matrix, make_keep(), out=scratch[original.dtype][: matrix.numel()].view(matrix.shape))
            originals[name] = original
            m.weight.data = native_layout(masked, kind, original.shape)

        def post(_m: nn.Module, _args: tuple, _out: Any, name: str = name) -> None:
            restore(name)

        mod = ir.get_module(name)
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for name in list(originals):
            restore(name)


def native_layout(matrix: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
    """Inverse of `weight_matrix`: an (out, in) matrix in the module's own weight layout."""
    if kind == "conv1d":
        return matrix.t()
    return matrix.reshape(shape)


def candidate_values(ir: ModelIR, ref: HeldOut, keep: Mapping[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
    """Fidelity of the model under `keep` masks on `ref`'s samples, one value per token (−KL) or per
    sample (cosine); higher is better. Non-finite outputs give −inf."""
    out = []
    with temporary_masks(ir, keep):
        for batch, target in zip(ref.batches, ref.outputs):
            y = _model_output(ir, batch, ref.kind)
            values = -token_kl(target, y) if ref.kind == "kl" else row_cosines(y, target)
            if not torch.isfinite(values).all():
                return torch.tensor([float("-inf")], dtype=torch.float64)
            out.append(values.flatten().double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def score_candidate(ir: ModelIR, ref: HeldOut, keep: Mapping[str, Callable[[], torch.Tensor]]) -> float:
    """Held-out fidelity of the model under `keep` masks: mean cosine, or −mean per-token KL."""
    return float(candidate_values(ir, ref, keep).mean())


# -- the auto allocation ----------------------------------------------------------------------------
def auto_allocation(settings: AutoSettings, ir: ModelIR, names: list[str], ctx: PassContext,
                    diagnostics: list[str]) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Per-layer ratios of the winning candidate for `names`, and the metrics describing the search."""
    started = time.perf_counter()
    calib = ctx.require_calibration("sparsity-allocation")
    stats_part, held = split_holdout(calib.samples, settings.holdout)
    if len(calib.samples) < 2:
        diagnostics.append("auto: only 1 calibration sample, so candidates are scored on the sample the statistics came from")
    block_names = [n for b in ir.blocks for n in b.layers]
    check_weights_finite(ir, block_names)
    norms = collect_input_norms(ir, stats_part, block_names)
    nm_layers = [n for n in block_names if n not in names and parse_pattern(ir.plan[n].pattern)
                 and ir.plan[n].target_sparsity is not None]
    ranks, fixed, stats = _layer_statistics(ir, settings, names, nm_layers, norms)
    t_stats = time.perf_counter() - started

    n_screen = screen_size(len(held))
    refs = [dense_reference(ir, part) for part in ((held[:n_screen], held[n_screen:]) if n_screen else (held,))]
    t_ref = time.perf_counter() - started - t_stats

    candidates = _build_candidates(settings, ir, names, stats, ctx, diagnostics)
    distinct = _mark_duplicates(candidates, names)
    per_row = settings.prune_method != "magnitude"

    def keep_of(cand: Candidate) -> dict[str, Callable[[], torch.Tensor]]:
        keep: dict[str, Callable[[], torch.Tensor]] = {
            n: (lambda r=ranks[n], s=cand.ratios[n]: keep_mask(r, s, per_row)) for n in names}
        keep.update({n: (lambda m=fixed[n]: m) for n in nm_layers})
        return keep

    values: dict[str, list[torch.Tensor]] = {}
    total = len(distinct) + (min(len(distinct), finalist_count(len(distinct)) + 1) if n_screen else 0)

    def score_round(cands: list[Candidate], ref: HeldOut) -> None:
        for cand in cands:
            t0 = time.perf_counter()
            values.setdefault(cand.name, []).append(candidate_values(ir, ref, keep_of(cand)))
            cand.seconds += time.perf_counter() - t0
            ctx.progress("sparsity-allocation:auto", sum(len(v) for v in values.values()), total)

    score_round(distinct, refs[0])
    if n_screen:  # racing: only the best of the screening round (and uniform) see the other samples
        screen = [float(values[c.name][0].mean()) for c in distinct]
        chosen = set(finalists(screen, finalist_count(len(distinct))))
        for i, c in enumerate(distinct):
            c.screen_score, c.screened_out = screen[i], i not in chosen
        score_round([c for c in distinct if not c.screened_out], refs[1])
    final = [c for c in distinct if not c.screened_out]
    for c in final:
        c.score = float(torch.cat(values[c.name]).mean())
    win = final[best_index([c.score for c in final])]
    # the optimum may lie past the grid: while the winner has the grid's largest λ, try larger ones
    grid_top, extended = max(settings.grid_lam, default=0.0), []
    for _ in range(MAX_EDGE_ROUNDS):
        new_lams = edge_extension(grid_top, win.family, win.params.get("lam"))
        if not new_lams:
            break
        family = "depth" if win.family.startswith("depth") else win.family
        more = [c for c in _build_candidates(replace(settings, grid_lam=new_lams, families=(family,)), ir, names, stats, ctx, diagnostics)
                if c.family == win.family and c.params.get("lam") in new_lams
                and all(c.params.get(k) == v for k, v in win.params.items() if k != "lam")]
        for c in more:
            values[c.name] = [candidate_values(ir, ref, keep_of(c)) for ref in refs]
            c.score = float(torch.cat(values[c.name]).mean())
        candidates += more
        final += more
        extended += list(new_lams)
        grid_top = max(new_lams)
        win = final[best_index([c.score for c in final])]
    spread = {c.name: standard_error(torch.cat(values[c.name])) for c in final}
    runner_up = max((c.score for c in final if c is not win and c.score is not None), default=None)
    uniform = candidates[0]
    t_total = time.perf_counter() - started
    seconds = {"statistics": t_stats, "reference": t_ref, "candidates": t_total - t_stats - t_ref, "total": t_total}
    records = [_candidate_record(c, ir) for c in candidates]
    metric = _metric_name(refs[0])
    _store_analyses(ir, settings, stats, records, win, metric, (len(stats_part), len(held), n_screen), seconds)
    ir.analyses["allocation_candidates"].update({"grid_extended": extended, "winner_se": spread[win.name]})
    if settings.prune_method == "sparsegpt":
        diagnostics.append("auto: sparsegpt candidates are ranked with Wanda masks (a proxy: SparseGPT also updates weights)")
    if extended:
        diagnostics.append(f"auto: the winner sat at the edge of the λ grid, so λ = {', '.join(f'{v:g}' for v in extended)} was also tried")
    margin = "" if runner_up is None else f", margin over the runner-up {win.score - runner_up:.3g}"
    diagnostics.append(f"auto: score standard error of the winner {spread[win.name]:.3g}{margin}")
    diagnostics.append(f"auto: {win.name} wins ({metric} {win.score:.5g} vs uniform {uniform.score:.5g}) among "
                       f"{len(final)} finalists of {len(distinct)} distinct candidates, {t_total:.1f}s")
    info = {
        "winner": win.name, "winner_score": win.score, "uniform_score": uniform.score, "fidelity": metric,
        "candidates_scored": len(distinct), "finalists": len(final), "holdout_samples": len(held),
        "screen_samples": n_screen, "stats_samples": len(stats_part),
        "prune_method": settings.prune_method, "auto_seconds": round(t_total, 3),
        "auto_seconds_detail": {k: round(v, 3) for k, v in seconds.items()},
        "candidates": records,
        "clamped_groups": win.clamped, "group_sparsity": _block_sparsity(ir, win.ratios),
        "grid_extended": extended, "winner_se": spread[win.name],
        "margin_over_runner_up": None if runner_up is None else win.score - runner_up,
        "score_se": spread,
    }
    return dict(win.ratios), info


def _mark_duplicates(candidates: list[Candidate], names: list[str]) -> list[Candidate]:
    """Candidates with distinct allocations (the first of each); the others get `duplicate_of`."""
    seen: dict[tuple, str] = {}
    distinct = []
    for cand in candidates:
        key = allocation_key([cand.ratios[n] for n in names])
        if key in seen:
            cand.duplicate_of = seen[key]
        else:
            seen[key] = cand.name
            distinct.append(cand)
    return distinct


def _metric_name(ref: HeldOut) -> str:
    return "-kl" if ref.kind == "kl" else "cosine"


def _layer_statistics(ir: ModelIR, settings: AutoSettings, names: list[str], nm_layers: list[str],
                      norms: dict[str, LayerStats]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], AllocationStats]:
    """Per block, from the Wanda scores (never all held at once): OWL outlier ratios for every m,
    the ranks that give any candidate's masks, and fixed N:M keep masks."""
    wanted, nm_set = set(names), set(nm_layers)
    ranks: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    ms = sorted(set(settings.grid_m) | {OWL_PAPER[1]})
    block_lod: dict[float, dict[int, float]] = {m: {} for m in ms}
    layer_lod: dict[float, dict[str, float]] = {m: {} for m in ms}
    for block in ir.blocks:
        if not block.layers:
            continue
        scores = [wanda_scores(ir.weight(n), norms[n].sq_norm) for n in block.layers]
        for m in ms:
            block_lod[m][block.index] = pooled_outlier_ratio(scores, m)
            for n, s in zip(block.layers, scores):
                layer_lod[m][n] = outlier_ratio(s, m)
        for n, s in zip(block.layers, scores):
            if n in wanted:
                ranks[n] = flat_ranks(magnitude_scores(ir.weight(n))) if settings.prune_method == "magnitude" else row_ranks(s)
            elif n in nm_set:
                src = magnitude_scores(ir.weight(n)) if settings.prune_method == "magnitude" else s
                fixed[n] = ~nm_mask(src, *parse_pattern(ir.plan[n].pattern))
    tokens = next(iter(norms.values())).tokens if norms else 0
    stats = AllocationStats(tuple(names), {n: norms[n].sq_norm for n in names}, tokens, block_lod, layer_lod,
                            settings.prune_method)
    return ranks, fixed, stats


def _build_candidates(settings: AutoSettings, ir: ModelIR, names: list[str], stats: AllocationStats, ctx: PassContext,
                      diagnostics: list[str]) -> list[Candidate]:
    groups = layer_groups(ir, names, settings.granularity)
    keys = list(groups)
    weights = [float(sum(ir.layers[n].params for n in groups[k])) for k in keys]
    if settings.granularity == "block":
        lods = {m: [float(v.get(k, 0.0)) for k in keys] for m, v in stats.block_outlier_ratio.items()}
    else:
        lods = {m: [float(v.get(k, 0.0)) for k in keys] for m, v in stats.outlier_ratio.items()}
    alphas = None
    if "alphapruning" in settings.families:
        try:
            per_layer = {n: gram_alpha(ir.weight(n)) for n in names}
            alphas = [sum(per_layer[n] for n in groups[k]) / len(groups[k]) for k in keys]
        except ValueError as exc:  # a degenerate spectrum: the family is skipped, not the search
            diagnostics.append(f"auto: AlphaPruning candidates skipped ({exc})")
    built = group_candidates(settings.target, weights, settings.grid_lam, lods, alphas, settings.families, settings.grid_m)
    out = [_from_groups(g, groups, keys) for g in built]
    out += _plugin_candidates(ir, names, stats, settings.target, ctx)
    return out


def _from_groups(g: GroupCandidate, groups: dict[Any, list[str]], keys: list[Any]) -> Candidate:
    ratios = {n: s for k, s in zip(keys, g.sparsities) for n in groups[k]}
    return Candidate(g.name, g.family, dict(g.params), ratios, g.clamped)


def _plugin_candidates(ir: ModelIR, names: list[str], stats: AllocationStats, target: float, ctx: PassContext) -> list[Candidate]:
    from compiler.registry import Registry

    registry = ctx.extras.get("registry") or Registry.default()
    out = []
    weights = [float(ir.layers[n].params) for n in names]
    for name, entry in sorted(registry.allocations.items()):
        try:
            raw = entry.obj().allocate(ir, stats, target)
        except Exception as exc:  # noqa: BLE001 - a plugin may raise anything
            raise PluginError(f"allocation '{name}' ({entry.origin}) failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(raw, Mapping):
            raise PluginError(f"allocation '{name}' ({entry.origin}) returned {type(raw).__name__}, not a mapping {{layer: ratio}}")
        values = []
        for n in names:
            v = raw.get(n, target)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise PluginError(f"allocation '{name}' gave layer '{n}' the ratio {v!r}: must be a number in [0, 1)")
            values.append(float(v))
        alloc = fit_to_target(values, weights, target)
        out.append(Candidate(f"plugin:{name}", "plugin", {}, dict(zip(names, alloc.sparsities)), alloc.clamped))
    return out


def _block_sparsity(ir: ModelIR, ratios: Mapping[str, float]) -> dict[str, float]:
    """Parameter-weighted sparsity of each block's allocated layers."""
    acc: dict[int, list[float]] = {}
    for n, r in ratios.items():
        a = acc.setdefault(ir.layers[n].block, [0.0, 0.0])
        a[0] += r * ir.layers[n].params
        a[1] += ir.layers[n].params
    return {str(b): s / p for b, (s, p) in sorted(acc.items()) if p}


def _candidate_record(c: Candidate, ir: ModelIR) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": c.name, "family": c.family, "params": dict(c.params), "score": c.score,
                           "seconds": round(c.seconds, 3), "clamped": c.clamped, "block_sparsity": _block_sparsity(ir, c.ratios)}
    if c.screen_score is not None:
        rec["screen_score"] = c.screen_score
        rec["screened_out"] = c.screened_out
    if c.duplicate_of:
        rec["duplicate_of"] = c.duplicate_of
    return rec


def _store_analyses(ir: ModelIR, settings: AutoSettings, stats: AllocationStats, records: list[dict[str, Any]], win: Candidate,
                    metric: str, sizes: tuple[int, int, int], seconds: dict[str, float]) -> None:
    n_stats, n_held, n_screen = sizes
    ir.analyses["allocation_candidates"] = {
        "winner": win.name, "fidelity": metric, "higher_is_better": True,
        "prune_method": settings.prune_method, "granularity": settings.granularity, "target": settings.target,
        "stats_samples": n_stats, "holdout_samples": n_held, "screen_samples": n_screen,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "candidates": records,
    }
    m = OWL_PAPER[1]  # the report's outlier columns/plots without a separate outlier-analysis pass
    ir.analyses.setdefault("outlier_ratio", dict(stats.outlier_ratio[m]))
    ir.analyses.setdefault("block_outlier_ratio", dict(stats.block_outlier_ratio[m]))
