"""The headline sparsity counts only the layers the plan prunes; layers left dense are listed apart."""

from __future__ import annotations

from compiler.report import headline, sparsity_summary


def test_headline_counts_pruned_layers_only():
    plan = {
        "layers.0.q": {"params": 100, "target_sparsity": 0.7, "measured_sparsity": 0.7},
        "layers.0.k": {"params": 300, "target_sparsity": 0.7, "measured_sparsity": 0.7},
        "lm_head": {"params": 600, "target_sparsity": None, "measured_sparsity": 0.0},
    }
    s = sparsity_summary(plan)
    assert s["overall_measured"] == 0.7 and s["pruned_params"] == 400
    assert s["dense_layers"] == {"lm_head": 600}
    assert abs(s["all_layers_measured"] - 0.28) < 1e-9 and s["prunable_params"] == 1000
    line = headline(s)
    assert line.startswith("sparsity 70.00% of 400 params in 2/3 pruned layers") and "lm_head 600" in line


def test_headline_with_nothing_pruned():
    s = sparsity_summary({"fc": {"params": 10, "target_sparsity": None, "measured_sparsity": 0.0}})
    assert s["overall_measured"] == 0.0 and s["pruned_params"] == 0 and s["layers_pruned"] == 0
