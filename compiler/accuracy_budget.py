"""Accuracy budget: the highest sparsity whose held-out quality stays within X of the dense model.

`sparsec compile MODEL --max-accuracy-drop X` without `--sparsity` bisects the target sparsity of the
shorthand pipeline (allocation + prune + the `--recover` passes + quantize) between `lo` and `hi`: each
trial compiles a fresh copy of the dense model at the midpoint and scores it on held-out text; a trial
within budget raises the lower bound, one outside lowers the upper bound. The best passing trial's
model *is* the result (no final recompile), so the search costs `steps` pipeline runs plus one
evaluation each. The drop is:
- causal LMs: perplexity ratio − 1 (X = 0.25 keeps perplexity ≤ 1.25 × dense);
- encoders (and plain modules): 1 − mean embedding (output) cosine with the dense model.
Quality is assumed to fall with sparsity (bisection). When no trial is within budget, nothing is
written and the error says the lowest sparsity tried and its drop — a broken model is never shipped.

Held-out text: the built-in `eval` corpus (not the calibration corpus), a short slice of it
(`eval_tokens`/`eval_texts`) so a trial's evaluation stays cheap. `--eval-data` reports on more of the
same corpus, so its figure is not independent of the search's choice; that is said in the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from compiler.errors import SparsecError, SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline, PipelineRun


class BudgetNotMet(SparsecError):
    """No sparsity tried keeps quality within the budget."""


@dataclass(frozen=True)
class BudgetConfig:
    max_drop: float
    lo: float = 0.2  # lowest sparsity the search considers
    hi: float = 0.9  # highest
    steps: int = 4  # bisection trials (resolution (hi - lo) / 2**steps)
    data: str = "eval"
    eval_tokens: int = 2048  # LMs: held-out tokens per trial
    eval_texts: int = 64  # encoders: held-out texts per trial

    def __post_init__(self) -> None:
        if not self.max_drop > 0:
            raise SpecError(f"--max-accuracy-drop must be > 0, got {self.max_drop}")
        if not 0.0 <= self.lo < self.hi < 1.0:
            raise SpecError(f"accuracy budget: need 0 <= lo < hi < 1, got lo={self.lo}, hi={self.hi}")
        if self.steps < 1:
            raise SpecError(f"accuracy budget: steps must be >= 1, got {self.steps}")


def quality_drop(result: dict[str, Any]) -> float:
    """Drop vs dense from an evaluation result: perplexity ratio − 1, or 1 − cosine."""
    if result["metric"] == "perplexity":
        return float(result["ratio"]) - 1.0
    return 1.0 - float(result["compiled"])


@dataclass
class BudgetResult:
    run: PipelineRun
    pipeline: Pipeline
    sparsity: float
    report: dict[str, Any]


def search_sparsity(ir: ModelIR, dense: ModelIR, ctx: PassContext, pipeline_for: Callable[[float], Pipeline],
                    cfg: BudgetConfig, instruments: list[Any] = ()) -> BudgetResult:
    """Bisect the target sparsity; `ir` stays dense (every trial runs on a copy)."""
    from compiler.evaluate import EvalConfig, Reference

    started = time.perf_counter()
    ref = Reference.build(dense, cfg.data, EvalConfig(max_tokens=cfg.eval_tokens, max_texts=cfg.eval_texts, greedy_prompts=0))
    ref_seconds = time.perf_counter() - started
    lo, hi = cfg.lo, cfg.hi
    best: tuple[float, PipelineRun, Pipeline] | None = None
    trials: list[dict[str, Any]] = []
    for _ in range(cfg.steps):
        s = round((lo + hi) / 2, 4)
        t0 = time.perf_counter()
        pipeline = pipeline_for(s)
        run = pipeline.run(ir.clone(), ctx, instruments)
        run.ir.refresh_measured_sparsity()
        result = ref.compare(run.ir)
        drop = quality_drop(result)
        ok = drop <= cfg.max_drop
        trials.append({"sparsity": s, "drop": round(drop, 6), "within_budget": ok, "metric": result["metric"],
                       "compiled": result["compiled"], "seconds": round(time.perf_counter() - t0, 2),
                       **({"top1_agreement": result["top1_agreement"]} if "top1_agreement" in result else {})})
        if ok:
            best = (s, run, pipeline)
            lo = s
        else:
            hi = s
        del run
    report = {"max_drop": cfg.max_drop, "drop_definition": "perplexity ratio - 1" if ref.metric == "perplexity" else "1 - cosine",
              "data": cfg.data, "eval_tokens" if ref.metric == "perplexity" else "eval_texts":
              cfg.eval_tokens if ref.metric == "perplexity" else cfg.eval_texts,
              "range": [cfg.lo, cfg.hi], "trials": trials, "reference_seconds": round(ref_seconds, 2),
              "seconds": round(time.perf_counter() - started, 2)}
    if best is None:
        t = min(trials, key=lambda x: x["sparsity"])
        raise BudgetNotMet(f"no sparsity within --max-accuracy-drop {cfg.max_drop}: the lowest tried, {t['sparsity']:.2f}, "
                           f"drops {t['drop']:.4f} ({report['drop_definition']}); raise the budget or add recovery (--recover)")
    s, run, pipeline = best
    report.update({"chosen": s, "resolution": round((hi - lo), 4),
                   "note": "chosen on a slice of the held-out corpus; --eval-data on the same corpus is not independent of this choice"})
    return BudgetResult(run, pipeline, s, report)
