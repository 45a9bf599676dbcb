"""Evaluation: strided perplexity, embedding fidelity, evaluate_pair, `sparsec eval`, `--calib self`."""

import json
import math

import pytest
import torch
from sparsity_helpers import load_ir, run_spec

from compiler.calibration import CalibrationConfig, build_calibration, load_texts
from compiler.evaluate import EvalConfig, corpus_ids, embedding_cosines, evaluate_pair, perplexity
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline
from compiler.registry import Registry

SMALL = EvalConfig(seqlen=64, stride=32, max_tokens=512, max_texts=16)


def test_single_window_perplexity_equals_the_models_own_loss(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    ids = corpus_ids(ir.tokenizer, load_texts("eval"), 48)
    ppl = perplexity(ir.module, ids, seqlen=64, stride=64)
    with torch.no_grad():
        loss = ir.module(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0), use_cache=False).loss
    assert ppl.windows == 1 and ppl.tokens == 47
    assert ppl.value == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_strided_windows_score_every_token_once(tiny_model_dir):
    ir = load_ir(tiny_model_dir("gpt2"))
    ids = corpus_ids(ir.tokenizer, load_texts("eval"), 300)
    strided = perplexity(ir.module, ids, seqlen=64, stride=16)
    assert strided.tokens == 299 and strided.windows == math.ceil((300 - 64) / 16) + 1
    # more context per scored token than disjoint windows, on the same tokens
    disjoint = perplexity(ir.module, ids, seqlen=64, stride=64)
    assert disjoint.tokens == 300 - math.ceil(300 / 64)


def test_evaluate_pair_causal_lm(tiny_model_dir):
    dense = load_ir(tiny_model_dir("llama"))
    same = evaluate_pair(dense, dense.clone(), "eval", CalibrationConfig(), SMALL)
    assert same["metric"] == "perplexity" and same["ratio"] == pytest.approx(1.0)
    pruned = run_spec(dense.clone(), "sparsity-allocation{method=uniform,target=0.9},prune{method=magnitude}", calibrate=False).ir
    res = evaluate_pair(dense, pruned, "eval", CalibrationConfig(), SMALL)
    assert res["compiled"] != pytest.approx(res["dense"]) and res["tokens"] == 511


def test_embedding_cosine_is_one_for_the_same_model_and_drops_with_pruning(tiny_model_dir):
    dense = load_ir(tiny_model_dir("bert"))
    texts = load_texts("eval")
    same = embedding_cosines(dense.module, dense.clone().module, dense.tokenizer, texts, SMALL)
    assert same.shape == (16,) and torch.allclose(same, torch.ones(16), atol=1e-5)
    pruned = run_spec(dense.clone(), "sparsity-allocation{method=uniform,target=0.8},prune{method=magnitude}", calibrate=False).ir
    res = evaluate_pair(dense, pruned, "eval", CalibrationConfig(), SMALL)
    assert res["metric"] == "embedding_cosine" and res["samples"] == 16
    assert res["min"] <= res["compiled"] < 0.9999


def test_eval_cli_on_an_artifact_and_on_a_plain_model(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    r = cli("compile", tiny_model_dir("llama"), "-o", out, "--calib-samples", "4", "--calib-seqlen", "32",
            "--sparsity", "0.6", "--eval-data", "eval")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["metric"] == "perplexity" and report["evaluation"]["dense"] > 1
    r = cli("eval", out, "--max-tokens", "300", "--seqlen", "64", "--stride", "32", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["reference"] == str(tiny_model_dir("llama")) and res["tokens"] == 299
    assert res["compiled"] > 1 and res["dense"] > 1
    r = cli("eval", tiny_model_dir("llama"), "--max-tokens", "200")
    assert r.exit_code == 0 and r.output.startswith("perplexity on 'eval'")
    r = cli("eval", tiny_model_dir("bert"))
    assert r.exit_code == 1 and "needs a dense reference" in r.output
    r = cli("eval", tiny_model_dir("llama"), "--data", tmp_path / "missing.txt")
    assert r.exit_code == 1 and "does not exist" in r.output


def test_self_generated_calibration_on_a_tiny_llama(tiny_model_dir):
    ir = load_ir(tiny_model_dir("llama"))
    calib = build_calibration(ir, CalibrationConfig(source="self", samples=2, seqlen=16))
    assert len(calib.samples) == 2 and calib.samples[0]["input_ids"].shape == (1, 16)
    pipeline = Pipeline.from_spec("outlier-analysis,sparsity-allocation{target=0.5},prune", Registry.default())
    run = pipeline.run(ir, PassContext(calibration=calib))
    assert run.records[0].metrics["tokens"] == 32  # 2 self-generated samples x 16 tokens
    assert run.records[-1].metrics["measured_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_compile_with_self_calibration(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "self"
    r = cli("compile", tiny_model_dir("llama"), "-o", out, "--calib", "self", "--calib-samples", "2", "--calib-seqlen", "24")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["source"] == "self" and manifest["calibration"]["samples"] == 2
    assert manifest["plan"]["model.layers.0.mlp.up_proj"]["measured_sparsity"] > 0.3


def test_stdlib_corpus_does_not_depend_on_what_the_process_imported(monkeypatch):
    """Other packages patch the standard library (ray replaces inspect.isgenerator, transformers adds
    Logger.warning_once): the corpus — and so every tokenizer and calibration set built from it — stays
    the same text for text."""
    import inspect
    import logging

    from compiler.calibration import stdlib_corpus

    before = {split: stdlib_corpus(split) for split in ("calib", "eval")}

    def isgenerator(obj):  # what a foreign package installs in its place
        return False

    def warning_once(self, msg):
        """A method a foreign package attaches to a stdlib class, with a docstring long enough to count."""

    isgenerator.__module__ = warning_once.__module__ = "somepackage.patches"
    monkeypatch.setattr(inspect, "isgenerator", isgenerator)
    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    after = {split: stdlib_corpus(split) for split in ("calib", "eval")}
    assert after == before
    # inspect is a calibration module: its replaced function keeps its original text
    assert any(t.startswith("Return true if the object is a generator.") for t in after["calib"])
