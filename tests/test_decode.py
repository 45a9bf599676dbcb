"""Decode loops with KV cache (runtimes/decode*.py): every backend's greedy tokens equal the torch
model's of the same weights; static and dynamic caches agree; bytes per token; bench --decode; verify."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import SparsecError

NEW = 12


@pytest.fixture(scope="module")
def llama_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    """Tiny Llama, 70% magnitude + int8, lowered and verified on onnxruntime (decode included)."""
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path_factory.mktemp("decode") / "art"
    args = ["compile", tiny_model_dir("llama"), "-o", out, "--sparsity", "0.7", "--method", "magnitude",
            "--allocation", "uniform", "--quantize", "int8", "--calib-samples", "4", "--calib-seqlen", "32",
            "--backend", "onnxruntime", "--runs", "2", "--seqlen", "32"]
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _prompt(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(6, 500, size=(1, n))
    return ids, np.ones_like(ids)


@pytest.fixture(scope="module")
def reference(llama_artifact) -> list[int]:
    from runtimes.decode.decoders import torch_greedy

    ids, mask = _prompt()
    return torch_greedy(llama_artifact / "model", ids, mask, NEW)


def _backend(name: str):
    from compiler.registry import Registry

    reg = Registry.default()
    if name not in reg.backends:
        pytest.skip(f"backend '{name}' is not registered here")
    backend = reg.get_backend(name)()
    ok, reason = backend.available()
    if not ok:
        pytest.skip(f"backend '{name}' unavailable: {reason}")
    return backend


def _generate(backend, root: Path, rel: str, tmp_path: Path, ids=None, mask=None, **opts):
    from runtimes.decode.decoders import DecodeOptions, open_decoder

    if ids is None:
        ids, mask = _prompt()
    options = DecodeOptions(prompt_len=32, new_tokens=NEW, **opts)
    with closing(open_decoder(backend, root / rel, _manifest(root)["lowering"], options, tmp_path / "work")) as dec:
        logits = dec.prefill_logits(ids, mask) if options.prefill == "engine" else None
        return dec.generate(ids, mask, NEW), logits, dict(dec.details)


@pytest.mark.parametrize("cache,prefill", [("dynamic", "engine"), ("static", "engine"), ("static", "tokens")])
def test_onnxruntime_loops_match_torch(llama_artifact, reference, tmp_path, cache, prefill):
    trace, logits, details = _generate(_backend("onnxruntime"), llama_artifact, "onnx/model.onnx", tmp_path,
                                       cache=cache, prefill=prefill)
    assert trace.tokens == reference
    assert len(trace.step_ms) == NEW - 1 and trace.prefill_ms > 0 and trace.peak_rss_bytes > 0
    assert details["cache"] == cache
    assert logits is None or logits.shape[:2] == (1, 20)


def test_static_cache_with_left_padding_matches_dynamic(llama_artifact, tmp_path):
    """A prompt shorter than the static prefill length is left-padded and masked: same tokens and
    logits as the dynamic cache on the exact prompt."""
    backend = _backend("onnxruntime")
    ids, mask = _prompt(9)
    dyn, dyn_logits, _ = _generate(backend, llama_artifact, "onnx/model.onnx", tmp_path / "d", ids, mask, cache="dynamic")
    sta, sta_logits, _ = _generate(backend, llama_artifact, "onnx/model.onnx", tmp_path / "s", ids, mask, cache="static")
    assert sta.tokens == dyn.tokens
    np.testing.assert_allclose(sta_logits, dyn_logits, atol=1e-4)


def test_static_cache_limits_are_one_line_errors(llama_artifact, tmp_path):
    from runtimes.decode.decoders import DecodeOptions, kv_shapes, open_decoder

    backend = _backend("onnxruntime")
    lowering = _manifest(llama_artifact)["lowering"]
    with closing(open_decoder(backend, llama_artifact / "onnx/model.onnx", lowering,
                              DecodeOptions(prompt_len=8, new_tokens=4, cache="static"), tmp_path)) as dec:
        ids, mask = _prompt(9)
        with pytest.raises(SparsecError, match="exceeds the static prefill length"):
            dec.generate(ids, mask, 4)
        with pytest.raises(SparsecError, match="exceed the static cache"):
            dec.generate(ids[:, :8], mask[:, :8], 5)
    with pytest.raises(SparsecError, match="causal-LM"):
        kv_shapes({"task": "feature-extraction", "inputs": ["input_ids"]})
    with pytest.raises(SparsecError, match="cache must be"):
        DecodeOptions(cache="ring")


def test_deepsparse_decode_matches_torch(llama_artifact, reference, tmp_path):
    backend = _backend("deepsparse")
    trace, logits, details = _generate(backend, llama_artifact, "onnx/model.onnx", tmp_path / "fp32")
    assert trace.tokens == reference
    assert details["cache"] == "static" and details["rss_process"] == "deepsparse worker"
    assert trace.peak_rss_bytes > 0 and details["precision"] == "fp32"
    assert details["weight_sparsity"] > 0.4  # the zeros reach the engine
    # the int8 QLinearMatMul variant runs the same loop (int8 tokens may differ from fp32 ones); one engine
    trace8, _, details8 = _generate(backend, llama_artifact, "onnx/int8-qoperator/model.onnx", tmp_path / "int8",
                                    prefill="tokens")
    assert len(trace8.tokens) == NEW and details8["precision"] == "int8 (QOperator)"


def test_openvino_decode_matches_torch(llama_artifact, reference, tmp_path):
    """OpenVINO decodes on the stateful model by default (the cache inside the infer request); the same
    tokens as torch, and the same logits as the graph with the cache as inputs/outputs."""
    backend = _backend("openvino")
    trace, logits, details = _generate(backend, llama_artifact, "onnx/model.onnx", tmp_path / "s")
    assert trace.tokens == reference
    assert details["cache"] == "stateful" and details["stateful"] is True
    dyn, dyn_logits, dyn_details = _generate(backend, llama_artifact, "onnx/model.onnx", tmp_path / "d", cache="dynamic")
    assert dyn.tokens == reference and dyn_details["cache"] == "dynamic"
    np.testing.assert_allclose(logits, dyn_logits, rtol=0, atol=2e-2 * float(np.abs(dyn_logits).max()))


def test_openvino_stateful_batch_drops_finished_rows(llama_artifact, tmp_path):
    """A batch of prompts of different lengths and budgets on one stateful request: each row's tokens
    equal its own batch-1 run (rows that finish early are dropped from the states)."""
    from runtimes.decode.decoders import DecodeOptions, open_decoder
    from runtimes.decode.loop import GenRequest, SamplingParams

    backend = _backend("openvino")
    lowering = _manifest(llama_artifact)["lowering"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(6, 500, size=n).tolist() for n in (5, 11, 8)]
    budgets = (3, 9, 6)
    with closing(open_decoder(backend, llama_artifact / "onnx/model.onnx", lowering,
                              DecodeOptions(prompt_len=32, new_tokens=NEW, threads=1), tmp_path)) as dec:
        assert dec.cache == "stateful" and dec.batched
        alone = []
        for p, b in zip(prompts, budgets):
            ids = np.asarray([p])
            alone.append(list(dec.generate(ids, np.ones_like(ids), b).tokens))
        batch = dec.complete([GenRequest(p, SamplingParams(max_tokens=b)) for p, b in zip(prompts, budgets)],
                             pad_id=0, eos_ids=())
    assert [list(r.tokens) for r in batch] == alone


def test_onnxruntime_io_binding_keeps_tokens_and_drops_rows(llama_artifact, tmp_path):
    """The IO-bound decoder (KV cache left in onnxruntime's memory between steps) gives the tokens and
    logits of the host-array loop, alone and in a batch whose rows finish at different steps."""
    from runtimes.decode.decoders import DecodeOptions, open_decoder
    from runtimes.decode.loop import GenRequest, SamplingParams

    backend = _backend("onnxruntime")
    lowering = _manifest(llama_artifact)["lowering"]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(6, 500, size=n).tolist() for n in (5, 11, 8)]
    budgets = (3, 9, 6)
    runs = {}
    for bind in (True, False):
        opts = DecodeOptions(prompt_len=32, new_tokens=NEW, threads=1, cache="dynamic", io_binding=bind)
        with closing(open_decoder(backend, llama_artifact / "onnx/model.onnx", lowering, opts, tmp_path / str(bind))) as dec:
            assert bool(dec.details.get("io_binding")) is bind
            ids, mask = _prompt()
            single = dec.generate(ids, mask, NEW).tokens
            batch = dec.complete([GenRequest(p, SamplingParams(max_tokens=b)) for p, b in zip(prompts, budgets)],
                                 pad_id=0, eos_ids=())
            runs[bind] = (list(single), [list(r.tokens) for r in batch], dec.prefill_logits(ids, mask))
    assert runs[True][0] == runs[False][0] and runs[True][1] == runs[False][1]
    assert [len(t) for t in runs[True][1]] == list(budgets)
    np.testing.assert_array_equal(runs[True][2], runs[False][2])


def test_onnxruntime_decodes_on_the_fused_graph_by_default(llama_artifact, reference, tmp_path):
    """Lowering wrote the fused decode graph beside model.onnx and beside the onnxruntime int8 variant;
    `cache="auto"` decodes on it, in place: the torch model's tokens, the portable graph's logits, and the
    server's batch of requests (run one by one) gives the portable batched decoder's tokens."""
    from runtimes.decode.decoders import DecodeOptions, open_decoder
    from runtimes.decode.loop import GenRequest, SamplingParams

    lowering = _manifest(llama_artifact)["lowering"]
    assert lowering["decode_graph"]["file"] == "onnx/decode_gqa.onnx"
    assert lowering["decode_graph"]["numerics"]["logits"] < 1e-4
    variant = lowering["variants"]["int8-qdq"]
    assert variant["decode_graph"]["file"] == "onnx/int8-qdq/decode_gqa.onnx"
    assert variant["decode_graph"]["layers_quantized"] == variant["layers_quantized"]
    assert (llama_artifact / variant["decode_graph"]["file"]).is_file()
    backend = _backend("onnxruntime")
    trace, fused_logits, details = _generate(backend, llama_artifact, "onnx/model.onnx", tmp_path / "f")
    assert details["cache"].startswith("in-place") and details["graph"] == "decode_gqa.onnx"
    assert trace.tokens == reference
    _, portable_logits, _ = _generate(backend, llama_artifact, "onnx/model.onnx", tmp_path / "p", cache="dynamic")
    np.testing.assert_allclose(fused_logits, portable_logits, atol=1e-4)
    rng = np.random.default_rng(2)
    requests = [GenRequest(rng.integers(6, 500, size=n).tolist(), SamplingParams(max_tokens=b))
                for n, b in ((5, 3), (11, 9), (8, 6))]
    tokens = {}
    for cache in ("auto", "dynamic"):
        opts = DecodeOptions(prompt_len=32, new_tokens=NEW, threads=1, cache=cache)
        for rel in ("onnx/model.onnx", variant["file"]):
            with closing(open_decoder(backend, llama_artifact / rel, lowering, opts, tmp_path / cache)) as dec:
                tokens[cache, rel] = [list(r.tokens) for r in dec.complete(requests, pad_id=0, eos_ids=())]
    assert tokens["auto", "onnx/model.onnx"] == tokens["dynamic", "onnx/model.onnx"]
    # int8: the fused and portable graphs quantize the same MatMuls from their own calibration runs
    same = sum(a == b for a, b in zip(tokens["auto", variant["file"]], tokens["dynamic", variant["file"]]))
    assert same >= 2, tokens


def test_weight_traffic_counts_zeros_and_int8(llama_artifact):
    from runtimes.decode.traffic import weight_traffic

    manifest = _manifest(llama_artifact)
    fp32 = weight_traffic(llama_artifact / "onnx/model.onnx")
    int8 = weight_traffic(llama_artifact / "onnx/int8-qdq/model.onnx")
    zeros = manifest["lowering"]["zeros"]["torch_zeros"]
    assert fp32.elements - fp32.nonzeros == zeros  # every pruned zero of the prunable layers, nothing else
    assert fp32.dense_bytes == 4 * fp32.elements
    assert fp32.sparse_bytes < fp32.dense_bytes and fp32.per_token(True) < fp32.per_token(False)
    # int8 layers: 1 byte per element; the LM head is int8 too when the quantize pass's head check put it in
    # the plan (include_outside_blocks=auto), else fp32 (4 bytes)
    head = manifest["plan"]["lm_head"]["params"]
    head_bytes = 1 if manifest["plan"]["lm_head"]["quant"] else 4
    assert int8.dense_bytes == (fp32.elements - head) + head_bytes * head
    assert fp32.embedding_row_bytes * int(json.loads((llama_artifact / "model/config.json").read_text())["vocab_size"]) \
        == fp32.embedding_bytes


def test_half_precision_runtimes_read_half_the_float_bytes(llama_artifact):
    from runtimes.decode.traffic import weight_traffic
    from runtimes.measure.decode_bench import runtime_float_itemsize

    # the precision strings the runtimes really report (OpenVINO: "bfloat16" on AMX machines)
    assert [runtime_float_itemsize(p) for p in ("bfloat16", "bf16", "f16", "fp32", "as in the graph", None)] == [2, 2, 2, 4, 4, 4]
    fp32 = weight_traffic(llama_artifact / "onnx/model.onnx")
    assert fp32.per_token(False, 2) == fp32.per_token(False, 4) - fp32.float_dense_bytes // 2


def test_bench_decode_cli(llama_artifact, cli, tmp_path):
    out = tmp_path / "decode.json"
    res = cli("bench", llama_artifact, "--decode", "--backend", "onnxruntime", "--threads", "2", "--seqlen", "24",
              "--tokens", "8", "--out", out)
    assert res.exit_code == 0, res.output
    assert "memory bandwidth" in res.output or "bandwidth" in res.output
    result = json.loads(out.read_text())["decode"][0]
    rows = {r["config"]: r for r in result["rows"]}
    assert {"compiled", "dense fp32"} <= set(rows)
    for r in rows.values():
        assert r["new_tokens"] == 8 and r["tokens_per_s"] > 0
        assert r["achieved_gbps"] == pytest.approx(r["weight_bytes_per_token"] * r["tokens_per_s"] / 1e9)
        assert r["fraction_of_membw"] == pytest.approx(r["achieved_gbps"] / result["membw"]["best_gbps"], rel=0.01)
        assert r["contention"]["available"] and r["contention"]["own_cores"] > 0 \
            and r["contention"]["threads"] == min(2, r["contention"]["usable_cpus"])
    assert rows["dense fp32"]["same_tokens_as_dense"] is True
    # the compiled int8 graph (blocks int8, LM head fp32) streams fewer bytes than dense fp32
    assert rows["compiled"]["weight_bytes_per_token"] < 0.6 * rows["dense fp32"]["weight_bytes_per_token"]
    assert rows["compiled"]["disk_bytes"] < rows["dense fp32"]["disk_bytes"]


def test_verify_reports_decode_tokens_per_s(llama_artifact):
    report = json.loads((llama_artifact / "report.json").read_text())
    ort = report["backends"]["onnxruntime"]
    assert ort["decode"]["compiled_tokens_per_s"] > 0 and ort["decode"]["dense_tokens_per_s"] > 0
    assert ort["latency"]["compiled"]["prefill"]["p50_ms"] > 0
    assert 0 < ort["cosine"] <= 1.0
