"""report.json (public shape), report.md (for humans) and plots.

report.json keys: `schema_version`, `source`, `pipeline`, `passes` (name, spec, seconds, modified,
metrics, diagnostics), `sparsity` (measured over the pruned layers, dense layers apart: `sparsity_summary`),
`evaluation` (optional),
`backends` (name -> {dense_p50_ms, compiled_p50_ms, speedup_vs_dense, max_abs_diff, cosine,
passed, batch_size, seqlen, threads, ...}), `notes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compiler.artifact import SCHEMA_VERSION


def build_report(manifest: dict[str, Any], records: list[Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    report_sparsity = sparsity_summary(manifest.get("plan", {}))
    report = {
        "schema_version": SCHEMA_VERSION,
        "source": manifest.get("source"),
        "pipeline": manifest.get("pipeline"),
        "passes": [
            {"name": r.name, "spec": r.spec, "seconds": round(r.seconds, 4), "modified": r.modified,
             "metrics": r.metrics, "diagnostics": r.diagnostics}
            for r in records
        ],
        "sparsity": report_sparsity,
        "evaluation": {},
        "backends": {},
        "notes": [],
    }
    report.update(extra or {})
    return report


def sparsity_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The headline sparsity: measured over the layers the plan prunes (those with a target), so a
    model whose tied embedding / lm_head stays dense by design is not reported as under-pruned.
    Prunable-kind layers the plan leaves dense are listed apart (`dense_layers`: name -> params), and
    `all_layers_measured` is the figure over every Linear/Conv weight, for comparison."""
    total_all = sum(p["params"] for p in plan.values())
    pruned = {n: p for n, p in plan.items() if p.get("target_sparsity") is not None}
    total = sum(p["params"] for p in pruned.values())
    zeros = sum(p["measured_sparsity"] * p["params"] for p in pruned.values())
    zeros_all = sum(p["measured_sparsity"] * p["params"] for p in plan.values())
    return {
        "pruned_params": total,
        "overall_measured": round(zeros / total, 6) if total else 0.0,
        "layers_pruned": len(pruned),
        "layers_total": len(plan),
        "dense_layers": {n: p["params"] for n, p in plan.items() if p.get("target_sparsity") is None},
        "prunable_params": total_all,
        "all_layers_measured": round(zeros_all / total_all, 6) if total_all else 0.0,
    }


def headline(s: dict[str, Any]) -> str:
    """One line: sparsity of the pruned layers, then what stayed dense (e.g. 'lm_head 28,311,552')."""
    dense = s.get("dense_layers") or {}
    tail = ""
    if dense:
        named = ", ".join(f"{n} {p:,}" for n, p in list(dense.items())[:3]) + (f", +{len(dense) - 3} more" if len(dense) > 3 else "")
        tail = f"; left dense: {named}"
    pruned = s.get("pruned_params", s.get("prunable_params", 0))
    return (f"sparsity {100 * s.get('overall_measured', 0):.2f}% of {pruned:,} params in "
            f"{s.get('layers_pruned', 0)}/{s.get('layers_total', 0)} pruned layers{tail}")


# The quality verdict (README "Quality verdict"): each agreement metric with the dense model gets a grade
# by these thresholds, and the worst grade is the verdict. (good, degraded) bounds; below/above: poor.
QUALITY_THRESHOLDS: dict[str, tuple[float, float]] = {
    "cosine": (0.98, 0.90),  # compiled vs dense outputs (embeddings, logits): higher is better
    "top-1 agreement": (0.90, 0.70),  # LMs: same next token as dense, held-out text
    "perplexity ratio": (1.10, 1.50),  # LMs: compiled / dense perplexity, held-out text: lower is better
}
QUALITY_ORDER = ("good", "degraded", "poor")


def _grade(metric: str, value: float) -> str:
    good, degraded = QUALITY_THRESHOLDS[metric]
    if metric == "perplexity ratio":
        return "good" if value <= good else "degraded" if value <= degraded else "poor"
    return "good" if value >= good else "degraded" if value >= degraded else "poor"


def quality_verdict(report: dict[str, Any]) -> dict[str, Any] | None:
    """{"verdict": good|degraded|poor, "evidence": [{what, metric, value, grade}]} from the held-out evaluation
    and every backend's output cosine; None when nothing was measured. A gate that passed says only that the
    thresholds the user set were met: this verdict is shown beside it so a bad model is never silently "passed"."""
    evidence = []

    def add(what: str, metric: str, value: Any) -> None:
        if isinstance(value, (int, float)) and value == value:
            evidence.append({"what": what, "metric": metric, "value": float(value), "grade": _grade(metric, float(value))})

    ev = report.get("evaluation") or {}
    if ev.get("metric") == "perplexity":
        add("held-out", "perplexity ratio", ev.get("ratio"))
        add("held-out", "top-1 agreement", ev.get("top1_agreement"))
    elif ev.get("metric") in ("embedding_cosine", "output_cosine"):
        add("held-out", "cosine", ev.get("compiled"))
    for name, b in (report.get("backends") or {}).items():
        add(name, "cosine", b.get("cosine"))
    if not evidence:
        return None
    worst = max(evidence, key=lambda e: QUALITY_ORDER.index(e["grade"]))
    return {"verdict": worst["grade"], "evidence": evidence, "worst": worst}


def quality_line(q: dict[str, Any]) -> str:
    """'quality: poor — held-out cosine 0.6100 (poor below 0.90; good from 0.98)'."""
    w = q["worst"]
    good, degraded = QUALITY_THRESHOLDS[w["metric"]]
    if w["metric"] == "perplexity ratio":
        bounds = f"good up to {good}, poor above {degraded}"
    else:
        bounds = f"good from {good}, poor below {degraded}"
    return f"quality: {q['verdict']} — {w['what']} {w['metric']} {w['value']:.4f} vs dense ({bounds})"


def relative_layer_names(manifest: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Layer name -> the name shown in narrow tables (relative to its block when it is inside one), and how a
    block's prefix reads ("encoder.layer.<k>"; "" when no layer was shortened). For an 80-column terminal."""
    blocks = {b["index"]: b["name"] for b in (manifest.get("structure") or {}).get("blocks", []) if b.get("name")}
    shown = {}
    for name, p in (manifest.get("plan") or {}).items():
        block = blocks.get(p.get("block"))
        shown[name] = name[len(block) + 1:] if block and name.startswith(block + ".") else name
    if shown == {n: n for n in shown}:
        return shown, ""
    heads = {b.rpartition(".")[0] for b in blocks.values()}
    tails_are_indices = all(b.rpartition(".")[2] == str(i) for i, b in blocks.items())
    prefix = f"{next(iter(heads))}.<k>" if len(heads) == 1 and tails_are_indices and next(iter(heads)) else \
        "; ".join(f"{i} = {b}" for i, b in sorted(blocks.items()))
    return shown, prefix


def budget_lines(b: dict[str, Any]) -> list[str]:
    """The accuracy-budget search in words: the budget, every trial, the choice."""
    lines = [f"budget: drop <= {b['max_drop']} ({b['drop_definition']}) on '{b['data']}'; "
             f"bisection over [{b['range'][0]}, {b['range'][1]}] in {b['seconds']:.1f} s"]
    for t in b.get("trials", []):
        extra = f", top-1 agreement {100 * t['top1_agreement']:.1f}%" if "top1_agreement" in t else ""
        lines.append(f"trial sparsity {t['sparsity']:.4f}: drop {t['drop']:.4f} "
                     f"({'within' if t['within_budget'] else 'over'} budget{extra}), {t['seconds']:.1f} s")
    if b.get("chosen") is not None:
        lines.append(f"chosen: sparsity {b['chosen']:.4f} (next untried step {b['resolution']:.4f} wide)")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def render_markdown(report: dict[str, Any], manifest: dict[str, Any]) -> str:
    src = manifest.get("source", {})
    lines = [f"# sparsec report — {src.get('model', '?')}", ""]
    s = report.get("sparsity", {})
    lines += [f"- pipeline: `{report.get('pipeline')}`",
              f"- measured {headline(s)}",
              *([f"- {quality_line(q)}"] if (q := quality_verdict(report)) else []),
              f"- calibration: {_fmt(manifest.get('calibration', {}))}", ""]
    lines += ["## Passes", "", "| pass | seconds | modified | metrics |", "|---|---:|---|---|"]
    for p in report.get("passes", []):
        metrics = {k: v for k, v in p["metrics"].items() if not isinstance(v, (dict, list))}
        lines.append(f"| {p['name']} | {p['seconds']:.2f} | {p['modified']} | {_fmt(metrics)} |")
    diags = [f"- {p['name']}: {d}" for p in report.get("passes", []) for d in p["diagnostics"]]
    if diags:
        lines += ["", "### Diagnostics", "", *diags]
    if report.get("accuracy_budget"):
        lines += ["", "## Accuracy budget search", "", *[f"- {line}" for line in budget_lines(report["accuracy_budget"])]]
    if report.get("evaluation"):
        lines += ["", "## Evaluation (compiled vs dense torch model)", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in report["evaluation"].items()]
    if report.get("backends"):
        lines += ["", "## Backends (compiled vs dense on the same backend)", "",
                  "| backend | dense p50 ms | compiled p50 ms | speedup [95% CI] verdict | max abs diff | cosine | passed |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, b in report["backends"].items():
            speed = speedup_text(b) if b.get("speedup_vs_dense") is not None else _fmt(None)
            lines.append(f"| {name} | {_fmt(b.get('dense_p50_ms'))} | {_fmt(b.get('compiled_p50_ms'))} | "
                         f"{speed} | {_fmt(b.get('max_abs_diff'))} | {_fmt(b.get('cosine'))} | {b.get('passed')} |")
        lines += ["", *[f"- {line}" for line in inconclusive_lines(report["backends"])]]
    lines += ["", "## Per-layer plan", "", "| layer | block | params | target | measured | pattern | outlier ratio |",
              "|---|---:|---:|---:|---:|---|---:|"]
    ratios = manifest.get("analyses", {}).get("outlier_ratio", {})
    for name, p in manifest.get("plan", {}).items():
        tgt = "dense" if p.get("target_sparsity") is None else f"{p['target_sparsity']:.3f}"
        r = ratios.get(name)
        lines.append(f"| {name} | {p.get('block')} | {p['params']:,} | {tgt} | {p['measured_sparsity']:.3f} | "
                     f"{p.get('pattern') or ''} | {'' if r is None else f'{r:.4f}'} |")
    lines += allocation_candidates_markdown(manifest.get("analyses", {}).get("allocation_candidates"))
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def speedup_text(r: dict[str, Any]) -> str:
    """"1.93x [1.85, 2.01] faster" (or the bare ratio for results recorded before intervals existed)."""
    iv = r.get("speedup_interval")
    if not iv:
        return f"{r['speedup_vs_dense']:.2f}x"
    if iv["verdict"] == "inconclusive" and iv["low"] != iv["low"]:  # NaN: too few rounds
        return f"{iv['median']:.2f}x inconclusive"
    return f"{iv['median']:.2f}x [{iv['low']:.2f}, {iv['high']:.2f}] {iv['verdict']}"


def inconclusive_lines(backends: dict[str, dict[str, Any]]) -> list[str]:
    """Why each inconclusive verdict is inconclusive (too few rounds, too noisy, machine busy), and how
    much CPU other processes took while each backend was timed."""
    lines = []
    for name, b in backends.items():
        for what, r in (("", b), (" decode", b.get("decode") or {})):
            iv = r.get("speedup_interval") or {}
            if iv.get("verdict") == "inconclusive":
                lines.append(f"{name}{what}: inconclusive — {iv.get('reason')}")
        c = (b.get("timing") or {}).get("contention")
        if c and c.get("available") and not c["contended"]:  # a contended one already said why above
            lines.append(f"{name}: other processes used {c['foreign_cores']:.2f} of {c['usable_cpus']} cores while it was "
                         f"timed (not contended: limit {c['limit_cores']:.2f})")
    return lines


def candidate_rows(auto: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(name, score, per-block sparsity, winner / duplicate mark) of every candidate that
    `sparsity-allocation{method=auto}` scored, best first; empty when it did not run."""
    if not auto or not auto.get("candidates"):
        return []
    def rank(c: dict[str, Any]) -> tuple[int, float]:
        if c.get("score") is not None:
            return 0, -c["score"]
        return (1, -c["screen_score"]) if c.get("screen_score") is not None else (2, 0.0)

    rows = []
    for c in sorted(auto["candidates"], key=rank):
        blocks = " ".join(f"{v:.3f}" for v in c.get("block_sparsity", {}).values())
        if c.get("duplicate_of"):
            score, mark = "", f"= {c['duplicate_of']}"
        elif c.get("score") is None:
            score, mark = f"({c['screen_score']:.5f})", "screened out"
        else:
            score, mark = f"{c['score']:.5f}", "winner" if c["name"] == auto.get("winner") else ""
        rows.append((c["name"], score, blocks, mark))
    return rows


def candidates_summary(auto: dict[str, Any]) -> str:
    screen = f" (all screened on the first {auto['screen_samples']}: scores in parentheses)" if auto.get("screen_samples") else ""
    return (f"fidelity {auto.get('fidelity')} on {auto.get('holdout_samples')} held-out calibration samples{screen}, "
            f"statistics from {auto.get('stats_samples')}, masks of prune method {auto.get('prune_method')}, "
            f"search {_fmt(auto.get('seconds', {}).get('total'))} s")


def allocation_candidates_markdown(auto: dict[str, Any] | None) -> list[str]:
    rows = candidate_rows(auto)
    if not rows:
        return []
    lines = ["", "## Allocation candidates (held-out fidelity, higher is better)", "", f"- {candidates_summary(auto)}", "",
             "| candidate | score | block sparsity | |", "|---|---:|---|---|"]
    return lines + [f"| {' | '.join(r)} |" for r in rows]


def reference_candidates(auto: dict[str, Any]) -> list[dict[str, Any]]:
    """Winner, OWL at the paper defaults (λ=0.08, m=5; else the first OWL candidate) and uniform."""
    cands = {c["name"]: c for c in auto.get("candidates", [])}
    owl = cands.get("owl(lam=0.08,m=5)") or next((c for c in cands.values() if c.get("family") == "owl"), None)
    chosen = [cands.get(auto.get("winner")), owl, cands.get("uniform")]
    out: list[dict[str, Any]] = []
    for c in chosen:
        if c is not None and all(c["name"] != o["name"] for o in out):
            out.append(c)
    return out


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_plan(manifest: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per-layer sparsity (target vs measured), outlier ratio and (after method=auto) per-block
    sparsity of the winning allocation vs OWL vs uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    plan = manifest.get("plan", {})
    names = list(plan)
    written = []
    if names:
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18), 3.5))
        x = range(len(names))
        ax.bar(x, [plan[n]["measured_sparsity"] for n in names], label="measured", color="#4477aa")
        ax.plot(x, [plan[n]["target_sparsity"] if plan[n]["target_sparsity"] is not None else float("nan") for n in names],
                "r.", label="target")
        ax.set_ylabel("sparsity")
        ax.set_xlabel("prunable layer (execution order)")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("Per-layer sparsity")
        written.append(_save(fig, out_dir / "sparsity.png"))
    ratios = manifest.get("analyses", {}).get("outlier_ratio", {})
    if ratios:
        keys = [n for n in names if n in ratios] or list(ratios)
        fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.18), 3.5))
        ax.bar(range(len(keys)), [100 * ratios[k] for k in keys], color="#cc6677")
        ax.set_ylabel("outlier ratio (%)")
        ax.set_xlabel("prunable layer (execution order)")
        ax.set_title("Per-layer activation outlier ratio (OWL)")
        written.append(_save(fig, out_dir / "outlier_ratio.png"))
    auto = manifest.get("analyses", {}).get("allocation_candidates")
    if auto and auto.get("candidates"):
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        for c in reference_candidates(auto):
            blocks = c.get("block_sparsity", {})
            score = f"{c['score']:.4f}" if c.get("score") is not None else f"screened out ({c.get('screen_score') or 0:.4f})"
            label = f"{c['name']}{' (winner)' if c['name'] == auto.get('winner') else ''}: {score}"
            ax.plot([int(b) for b in blocks], list(blocks.values()), marker="o", label=label)
        ax.set_xlabel("block")
        ax.set_ylabel("sparsity")
        ax.set_title(f"Per-block sparsity: auto's winner vs OWL vs uniform ({auto.get('fidelity')})")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "allocation.png"))
    return written
