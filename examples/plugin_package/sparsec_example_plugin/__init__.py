"""Example installable plugin: an analysis pass recording per-layer weight statistics.

Installed with `pip install examples/plugin_package`, it appears in `sparsec passes` with its entry
point as origin and can be used in any spec: `--passes "weight-stats,prune{method=magnitude}"`.
"""

from dataclasses import dataclass

from compiler import Pass, PassResult, option, register_pass


@register_pass
@dataclass(frozen=True)
class WeightStats(Pass):
    """Analysis: RMS and share of near-zero weights per prunable layer (never changes weights)."""

    name = "weight-stats"
    eps: float = option(1e-3, "|w| below this counts as near-zero")

    def call(self, ir, ctx) -> PassResult:
        stats = {}
        for name in ir.layers:
            w = ir.weight(name)
            stats[name] = {"rms": float(w.pow(2).mean().sqrt()), "near_zero": float((w.abs() < self.eps).float().mean())}
        ir.analyses["weight_stats"] = stats
        mean_rms = sum(s["rms"] for s in stats.values()) / max(len(stats), 1)
        return PassResult(ir, modified=False, metrics={"layers": len(stats), "mean_rms": round(mean_rms, 6)})
