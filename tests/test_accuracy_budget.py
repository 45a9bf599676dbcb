"""--max-accuracy-drop without --sparsity: bisection for the highest sparsity within the budget."""

from __future__ import annotations

import json

import pytest

from compiler.accuracy_budget import BudgetConfig, quality_drop
from compiler.errors import SpecError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_HOME", str(tmp_path / "home"))


def test_quality_drop_definitions():
    assert quality_drop({"metric": "perplexity", "ratio": 1.2, "compiled": 12.0}) == pytest.approx(0.2)
    assert quality_drop({"metric": "embedding_cosine", "compiled": 0.95}) == pytest.approx(0.05)
    with pytest.raises(SpecError, match="must be > 0"):
        BudgetConfig(max_drop=0)
    with pytest.raises(SpecError, match="lo < hi"):
        BudgetConfig(max_drop=0.1, lo=0.8, hi=0.5)


def _budget(out):
    return json.loads((out / "report.json").read_text())["accuracy_budget"]


def test_search_picks_the_highest_passing_trial_minilm(cli, tmp_path):
    out = tmp_path / "art"
    res = cli("compile", "minilm", "-o", out, "--max-accuracy-drop", "0.05", "--allocation", "uniform",
              "--method", "wanda", "--calib-samples", 8, "--calib-seqlen", 64)
    assert res.exit_code == 0, res.output
    b = _budget(out)
    assert len(b["trials"]) == 4 and "trial sparsity" in res.output
    passing = [t for t in b["trials"] if t["within_budget"]]
    failing = [t for t in b["trials"] if not t["within_budget"]]
    assert passing and b["chosen"] == max(t["sparsity"] for t in passing)
    assert all(f["sparsity"] > b["chosen"] for f in failing)  # bisection: everything over budget is sparser
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"]["overall_measured"] - b["chosen"]) < 0.01
    chosen = next(t for t in b["trials"] if t["sparsity"] == b["chosen"])
    assert chosen["drop"] <= 0.05 and chosen["metric"] == "embedding_cosine"
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"target={b['chosen']!r}" in manifest["pipeline"]


def test_search_with_recovery_on_a_tiny_llama(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    res = cli("compile", tiny_model_dir("llama"), "-o", out, "--max-accuracy-drop", "0.02", "--allocation", "uniform",
              "--recover", "reconstruct", "--calib-samples", 8, "--calib-seqlen", 32)
    assert res.exit_code == 0, res.output
    b = _budget(out)
    assert all(t["metric"] == "perplexity" for t in b["trials"]) and "top1_agreement" in b["trials"][0]
    names = [p["name"] for p in json.loads((out / "report.json").read_text())["passes"]]
    assert names[-1] == "reconstruct"


def test_budget_not_met_writes_nothing(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    res = cli("compile", tiny_model_dir("bert"), "-o", out, "--max-accuracy-drop", "0.0000001", "--allocation", "uniform",
              "--method", "magnitude")
    assert res.exit_code == 1 and "no sparsity within --max-accuracy-drop" in res.output
    assert not out.exists()


def test_budget_with_passes_is_an_error(cli, tiny_model_dir, tmp_path):
    res = cli("compile", tiny_model_dir("llama"), "-o", tmp_path / "a", "--max-accuracy-drop", "0.1", "--passes", "prune{method=magnitude}")
    # with --passes the flag stays the backend gate (no backends here): the compile itself must not search
    assert "accuracy_budget" not in res.output
    res = cli("compile", tiny_model_dir("llama"), "-o", tmp_path / "b", "--max-accuracy-drop", "0.1", "--pattern", "2:4")
    assert res.exit_code == 1 and "--pattern 2:4 fixes it" in res.output
