"""auto allocation: λ grid extended when the winner sits at its edge; score spread reported; screening
only with enough held-out samples."""

from __future__ import annotations

import math

import torch
from sparsity_helpers import load_ir, run_spec

from passes.math.candidates import edge_extension, screen_size, standard_error


def test_edge_extension_only_at_the_top_of_the_grid():
    assert edge_extension(0.15, "owl", 0.15) == (0.225, 0.3)
    assert edge_extension(0.15, "depth-up", 0.1) == ()
    assert edge_extension(0.15, "uniform", None) == ()
    assert edge_extension(0.3, "alphapruning", 0.3) == (0.45,)  # 0.6 is past the cap
    assert edge_extension(0.4, "owl", 0.4) == ()


def test_screening_needs_enough_held_out_samples():
    assert screen_size(8) == 0  # every candidate sees all 8 (2-sample screening misranked on SmolLM2)
    assert screen_size(16) == 4 and screen_size(32) == 8


def test_standard_error():
    assert math.isnan(standard_error(torch.tensor([1.0])))
    assert abs(standard_error(torch.tensor([1.0, 3.0])) - math.sqrt(2.0) / math.sqrt(2)) < 1e-6


def test_auto_reports_spread_and_extends_an_edge_winner(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    run = run_spec(ir, "sparsity-allocation{method=auto,target=0.6,grid_lam=0.02,families=depth},prune{method=wanda}", samples=8)
    auto = run.ir.analyses.get("allocation_candidates") or run.analyses["allocation_candidates"]
    metrics = run.records[0].metrics
    info = metrics.get("auto", metrics)
    winner = next(c for c in auto["candidates"] if c["name"] == auto["winner"])
    lam = (winner.get("params") or {}).get("lam")
    if info["grid_extended"]:
        assert any(c["name"].endswith("(lam=0.03)") or "0.03" in c["name"] for c in auto["candidates"])
    else:  # no extension: the winner is uniform or inside the grid
        assert lam is None or lam < 0.02 + 1e-9
    assert info["winner_se"] >= 0 and set(info["score_se"]) >= {auto["winner"]}
