"""`--backend sparsec` end to end: compile → pack (sparse on disk) → verify against dense on the same
engine → greedy tokens equal the torch model's → serve completions and embeddings through it."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

NEW = 10


def _compile(model: str | Path, out: Path, *extra: str) -> dict:
    from compiler.cli import main

    args = ["compile", str(model), "-o", str(out), "--sparsity", "0.7", "--method", "magnitude", "--allocation",
            "uniform", "--calib-samples", "4", "--calib-seqlen", "32", "--backend", "sparsec", "--runs", "3",
            "--seqlen", "32", *extra]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def llama_int8(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sparsec") / "llama"
    return out, _compile(tiny_model_dir("llama"), out, "--quantize", "int8")


def test_llama_packed_sparse_on_disk(llama_int8):
    from safetensors import safe_open

    out, _ = llama_int8
    fmt = json.loads((out / "sparsec" / "format.json").read_text())
    plan = {n: e for n, e in json.loads((out / "manifest.json").read_text())["plan"].items() if e.get("target_sparsity")}
    kinds = {n: v["kind"] for n, v in fmt["layers"].items()}
    assert {kinds[n] for n in plan} == {"sparse-int8"}
    assert "lm_head" in kinds and kinds["lm_head"] == "dense-int8"
    with safe_open(str(out / "sparsec" / "weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    # packed arrays only: no dense weight matrix of a planned layer is on disk in the packed file
    assert not any(k.endswith(".weight") for k in keys)
    packed = sum(v["bytes"] for n, v in fmt["layers"].items() if n in plan)
    dense = sum(v["dense_fp32_bytes"] for n, v in fmt["layers"].items() if n in plan)
    # 70 % sparse int8 + 1/8-byte masks ≈ 0.43 B/weight vs 4 B fp32 (+ per-row metadata on tiny layers)
    assert packed < 0.2 * dense


def test_llama_verify_on_sparsec(llama_int8):
    _, report = llama_int8
    r = report["backends"]["sparsec"]
    labels = set(r["dense_configs_p50_ms"])
    assert {"dense fp32", "dense int8 (sparsec kernel)"} <= labels
    assert r.get("decode"), r
    assert r["latency"]["compiled"]["decode"]["tokens_per_s"] > 0
    # the sparse-kernel proof: which layers the compiled model runs on which kernel
    kinds = r["runtime"]["packed_layers"]
    assert sum(k == "sparse-int8" for k in kinds.values()) == 14 and kinds["lm_head"] == "dense-int8"
    assert r["sparse_kernels"]["sparse-int8"] == 14


def test_llama_greedy_tokens_equal_torch(llama_int8, tiny_model_dir):
    """fp32 packing is exact up to summation order: the kernels reproduce the torch model's greedy tokens."""
    from runtimes.decode.decoders import DecodeOptions, torch_greedy
    from runtimes.sparsec_backend import SparsecBackend

    out, _ = llama_int8
    fp32 = out.parent / "llama-fp32"
    _compile(tiny_model_dir("llama"), fp32)
    ids = np.random.default_rng(0).integers(6, 500, size=(1, 16))
    mask = np.ones_like(ids)
    ref = torch_greedy(fp32 / "model", ids, mask, NEW)
    backend = SparsecBackend()
    lowering = json.loads((fp32 / "manifest.json").read_text())["lowering"]
    with closing(backend.decoder(fp32 / "sparsec", lowering, DecodeOptions(prompt_len=16, new_tokens=NEW, threads=2),
                                 fp32 / "work")) as dec:
        got = dec.generate(ids, mask, NEW).tokens
        assert dec.details["layers_run"] > 0
    assert got[:NEW] == ref[:NEW]


@pytest.fixture(scope="module")
def llama_int4(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sparsec") / "llama-int4"
    return out, _compile(tiny_model_dir("llama"), out, "--quantize", "int4")


def _fake_quant_linear(weight, bias):
    """torch reference of a packed int8/int4 layer: the layer's own stored (dequantized) weights, and
    activations quantized per token to int8 the way the kernels do (scale = max|x| / 127, half-even)."""
    import torch

    class FakeQuantLinear(torch.nn.Module):
        def forward(self, x):
            return _fake_quant_forward(x, weight.double(), None if bias is None else bias.double())

    return FakeQuantLinear()


def _fake_quant_forward(x, weight, bias):
    import torch

    xd = x.double()
    scale = xd.abs().amax(-1, keepdim=True) / 127.0
    xq = torch.round(xd / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-127, 127) * scale
    y = xq @ weight.T
    return (y if bias is None else y + bias).to(x.dtype)


def test_llama_int4_packs_sparse_int4_and_verifies(llama_int4):
    out, report = llama_int4
    fmt = json.loads((out / "sparsec" / "format.json").read_text())
    full_plan = json.loads((out / "manifest.json").read_text())["plan"]
    plan = {n: e for n, e in full_plan.items() if e.get("target_sparsity")}
    kinds = {n: v["kind"] for n, v in fmt["layers"].items()}
    assert {kinds[n] for n in plan} == {"sparse-int4"}
    # the LM head: dense int4 when the quantize pass planned it (dense: no mask), else our dense int8 head
    head_int4 = (full_plan.get("lm_head") or {}).get("quant") == "int4"
    assert kinds["lm_head"] == ("dense-int4" if head_int4 else "dense-int8")
    packed = sum(v["bytes"] for n, v in fmt["layers"].items() if n in plan)
    dense = sum(v["dense_fp32_bytes"] for n, v in fmt["layers"].items() if n in plan)
    assert packed < 0.15 * dense  # ~0.31 B/weight at 70 % (+ per-row data on tiny layers) vs 4 B fp32
    r = report["backends"]["sparsec"]
    assert {"dense fp32", "dense int8 (sparsec kernel)", "dense int4 (sparsec kernel)"} <= set(r["dense_configs_p50_ms"])
    assert r["sparse_kernels"]["sparse-int4"] == len(plan)


def test_llama_int4_greedy_tokens_equal_fake_quantized_torch(llama_int4):
    """The sparse int4 model decodes the same greedy tokens as the torch model holding the same quantized
    weights (and the same per-token int8 activations)."""
    import torch

    from runtimes.decode.decoders import DecodeOptions
    from runtimes.kernels.format import load_packed, unpack_dense
    from runtimes.kernels.pack import load_artifact_model
    from runtimes.sparsec_backend import SparsecBackend

    out, _ = llama_int4
    ref = load_artifact_model(out / "model")
    for name, p in load_packed(out / "sparsec" / "weights.safetensors").items():
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, _fake_quant_linear(unpack_dense(p), p.bias))
    ids = np.random.default_rng(0).integers(6, 500, size=(1, 16))
    with torch.inference_mode():
        expected = ref.generate(torch.from_numpy(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    lowering = json.loads((out / "manifest.json").read_text())["lowering"]
    with closing(SparsecBackend().decoder(out / "sparsec", lowering, DecodeOptions(prompt_len=16, new_tokens=NEW, threads=2),
                                          out / "work")) as dec:
        got = dec.generate(ids, np.ones_like(ids), NEW).tokens
    assert got[:NEW] == expected[0, 16:].tolist()


def test_llama_bf16_compiles_verifies_and_decodes_like_the_rounded_model(tiny_model_dir, tmp_path):
    """`--quantize bf16 --backend sparsec`: the plan packs sparse bf16 layers and a dense bf16 head, no ONNX
    variant is written (the scheme is the backend's own form), verification times our dense bf16 kernel beside
    fp32, and greedy decode equals the torch model holding the same bf16-rounded weights."""
    import torch

    from runtimes.decode.decoders import DecodeOptions
    from runtimes.kernels.format import load_packed, unpack_dense
    from runtimes.kernels.pack import load_artifact_model
    from runtimes.sparsec_backend import SparsecBackend

    out = tmp_path / "llama-bf16"
    report = _compile(tiny_model_dir("llama"), out, "--quantize", "bf16")
    manifest = json.loads((out / "manifest.json").read_text())
    planned = {n for n, e in manifest["plan"].items() if e.get("quant") == "bf16"}
    kinds = {n: v["kind"] for n, v in json.loads((out / "sparsec" / "format.json").read_text())["layers"].items()}
    blocks = {n for n in planned if manifest["plan"][n].get("target_sparsity")}
    assert len(blocks) == 14 and {kinds[n] for n in blocks} == {"sparse-bf16"} and kinds["lm_head"] == "dense-bf16"
    assert manifest["lowering"]["variants"] == {} and not (out / "onnx" / "int8-dynamic").exists()
    from compiler.lowering.quant import BACKEND_LOWERED

    assert SparsecBackend.quant_form("bf16", True) == BACKEND_LOWERED
    r = report["backends"]["sparsec"]
    assert {"dense fp32", "dense bf16 (sparsec kernel)"} <= set(r["dense_configs_p50_ms"])
    assert r["sparse_kernels"]["sparse-bf16"] == 14

    ref = load_artifact_model(out / "model")
    for name, p in load_packed(out / "sparsec" / "weights.safetensors").items():
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(unpack_dense(p))
    ids = np.random.default_rng(0).integers(6, 500, size=(1, 16))
    with torch.inference_mode():
        expected = ref.generate(torch.from_numpy(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with closing(SparsecBackend().decoder(out / "sparsec", manifest["lowering"],
                                          DecodeOptions(prompt_len=16, new_tokens=NEW, threads=2), out / "work")) as dec:
        got = dec.generate(ids, np.ones_like(ids), NEW).tokens
        assert dec.details["host"].startswith("lean")
    assert got[:NEW] == expected[0, 16:].tolist()


def test_bf16_on_another_backend_is_refused_before_loading(tiny_model_dir, tmp_path):
    from compiler.cli import main

    res = CliRunner().invoke(main, ["compile", str(tiny_model_dir("llama")), "-o", str(tmp_path / "x"), "--sparsity",
                                    "0.5", "--quantize", "bf16", "--backend", "onnxruntime"])
    assert res.exit_code != 0
    line = res.output.strip().splitlines()[-1]
    assert "--quantize bf16 is not supported by backend onnxruntime (it runs on: sparsec)" in line
    assert not (tmp_path / "x").exists()


def test_bert_embeddings_match_torch(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModel

    from runtimes.base import RunnerOptions
    from runtimes.sparsec_backend import SparsecBackend

    out = tmp_path / "bert"
    report = _compile(tiny_model_dir("bert"), out)
    assert "sparsec" in report["backends"]
    runner = SparsecBackend().runner(out / "sparsec", RunnerOptions(threads=2))
    ids = np.random.default_rng(1).integers(5, 200, size=(2, 24))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = runner.infer(feeds)["last_hidden_state"]
    ref_model = AutoModel.from_pretrained(str(out / "model")).eval()
    with torch.inference_mode():
        ref = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(2, 24, dtype=torch.long))
    np.testing.assert_allclose(got, ref.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
    pruned = [n for n, e in json.loads((out / "manifest.json").read_text())["plan"].items() if e.get("target_sparsity")]
    assert set(pruned) <= set(runner.layers_run())  # every pruned layer ran on a packed kernel


def test_gpt2_conv1d_packs_and_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "gpt2"
    report = _compile(tiny_model_dir("gpt2"), out)
    assert report["backends"]["sparsec"]["decode"]


def test_serve_embeddings_and_completions_on_sparsec(llama_int8, tiny_model_dir, tmp_path):
    """A real server process on the sparsec backend: embeddings equal torch's, completions equal the
    backend's own greedy decode (streamed and not)."""
    from test_serve import reference_embeddings, start_server

    bert = tmp_path / "bert"
    _compile(tiny_model_dir("bert"), bert)
    texts = ["Return the sum of a and b.", "Open a file and return a stream.", "x"]
    server = start_server(bert, tmp_path, "--backend", "sparsec", "--model-name", "b")
    try:
        with server.client() as c:
            r = c.post("/v1/embeddings", json={"input": texts, "model": "b"})
            assert r.status_code == 200, r.text
            got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, reference_embeddings(bert / "model", texts), atol=2e-4)
    finally:
        assert server.stop() == 0, server.log_text()

    art, _ = llama_int8
    server = start_server(art, tmp_path, "--backend", "sparsec", "--model-name", "l")
    try:
        with server.client() as c:
            body = {"model": "l", "prompt": "hello world", "max_tokens": 6}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert r.json()["usage"]["completion_tokens"] == 6
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                chunks = [line for line in s.iter_lines() if line.startswith("data: {")]
            streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in chunks)
            assert streamed == text
        assert "sparsec" in server.log_text()
    finally:
        assert server.stop() == 0, server.log_text()
