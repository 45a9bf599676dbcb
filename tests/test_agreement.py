"""Evaluation beyond perplexity: top-1 and greedy-continuation agreement (LMs), nearest-neighbour
retrieval overlap (encoders), and the on-disk cache of the dense side."""

from __future__ import annotations

import pytest
import torch
from sparsity_helpers import load_ir, run_spec

from compiler import agreement
from compiler.evaluate import EvalConfig, Reference

SMALL = EvalConfig(seqlen=64, stride=32, max_tokens=256, max_texts=24, greedy_prompts=3, greedy_prompt_len=8, greedy_tokens=6, knn=4)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_HOME", str(tmp_path / "home"))


def test_greedy_agreement_counts_prefix_and_positions():
    a = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])]
    b = [torch.tensor([1, 2, 9, 4]), torch.tensor([5, 6, 7, 8])]
    got = agreement.greedy_agreement(a, b)
    assert got == {"greedy_prefix_match": (0.5 + 1.0) / 2, "greedy_token_agreement": (0.75 + 1.0) / 2}


def test_retrieval_overlap_is_one_for_same_embeddings_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 16, generator=g)
    nn_dense = agreement.neighbours(emb, 5)
    assert agreement.retrieval_overlap(nn_dense, emb, 5) == 1.0
    assert agreement.retrieval_overlap(nn_dense, emb + 2.0 * torch.randn(40, 16, generator=g), 5) < 0.8
    assert not (nn_dense == torch.arange(40).unsqueeze(1)).any()  # a text is never its own neighbour


def test_lm_agreement_is_perfect_for_the_dense_model_and_drops_when_pruned(tiny_model_dir):
    dense = load_ir(tiny_model_dir("llama"))
    ref = Reference.build(dense.clone(), "eval", SMALL)
    same = ref.compare(dense)
    assert same["top1_agreement"] == 1.0 and same["greedy_prefix_match"] == 1.0 and same["greedy_token_agreement"] == 1.0
    assert same["greedy_prompts"] == 3 and same["greedy_tokens"] == 6
    pruned = run_spec(load_ir(tiny_model_dir("llama")), "sparsity-allocation{method=uniform,target=0.9},prune{method=magnitude}", calibrate=False).ir
    worse = ref.compare(pruned)
    assert worse["top1_agreement"] < 1.0 and worse["greedy_token_agreement"] < 1.0


def test_dense_reference_is_cached_per_model_and_data(tiny_model_dir):
    dense = load_ir(tiny_model_dir("llama"))
    first = Reference.build(dense, "eval", SMALL)
    second = Reference.build(dense, "eval", SMALL)
    assert not first.cached and second.cached
    assert second.dense_ppl.value == first.dense_ppl.value and torch.equal(second.dense_ppl.top1, first.dense_ppl.top1)
    assert all(torch.equal(a, b) for a, b in zip(first.dense_greedy, second.dense_greedy))
    other = Reference.build(dense, "eval", EvalConfig(seqlen=64, stride=32, max_tokens=128, greedy_prompts=2))
    assert not other.cached  # different settings: a different entry
    for p in dense.module.parameters():  # different weights: a different entry
        p.data.mul_(0.5)
        break
    assert not Reference.build(dense, "eval", SMALL).cached


def test_same_weights_with_another_tokenizer_do_not_hit_the_cache(tiny_model_dir):
    """The cache covers what is scored: the same weights under a tokenizer that maps the text to other ids
    (another vocabulary, or a corpus that differs between machines) must be computed afresh."""
    from compiler.tiny_models import train_tokenizer

    dense = load_ir(tiny_model_dir("llama"))
    first = Reference.build(dense, "eval", SMALL)
    other_tok = train_tokenizer(vocab_size=300)  # fewer merges: the same text becomes other (more) ids
    assert len(other_tok) <= dense.config.vocab_size
    dense.tokenizer = other_tok
    again = Reference.build(dense, "eval", SMALL)
    assert not again.cached and not torch.equal(again.ids, first.ids)
    assert again.dense_ppl.value != first.dense_ppl.value
    assert Reference.build(dense, "eval", SMALL).cached  # and that one is cached under its own ids


def test_encoder_retrieval_overlap(tiny_model_dir):
    dense = load_ir(tiny_model_dir("bert"))
    ref = Reference.build(dense.clone(), "eval", SMALL)
    assert ref.compare(dense)["retrieval_overlap@4"] == 1.0
    pruned = run_spec(load_ir(tiny_model_dir("bert")), "sparsity-allocation{method=uniform,target=0.9},prune{method=magnitude}", calibrate=False).ir
    assert ref.compare(pruned)["retrieval_overlap@4"] < 1.0


def test_eval_cli_prints_agreement(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    assert cli("compile", tiny_model_dir("llama"), "-o", out, "--sparsity", "0.5", "--allocation", "uniform",
               "--calib-samples", 4, "--calib-seqlen", 32).exit_code == 0
    res = cli("eval", out, "--max-tokens", 256, "--seqlen", 64, "--greedy-prompts", 2, "--greedy-tokens", 4)
    assert res.exit_code == 0, res.output
    assert "top-1 agreement with dense" in res.output and "greedy continuations (2 prompts x 4 tokens)" in res.output
