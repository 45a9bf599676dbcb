"""Block streaming (compiler/streaming, docs/streaming.md): a compile that streams blocks from disk
produces the same plan and bit-identical weights as the in-memory compile, for every kind of pass.

The tiny Llama is saved as sharded safetensors in fp16 and in fp32 (and once with tied embeddings);
each pipeline is compiled twice (--no-stream / --stream) and the manifests' plans and analyses and
every tensor of the two model directories are compared exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compiler.calibration import CalibrationConfig
from compiler.compile import CompileOptions, compile_model
from compiler.errors import SpecError

CALIB = CalibrationConfig(samples=8, seqlen=32)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{'fp16', 'fp32', 'tied'}: the same tiny Llama as sharded safetensors (4-5 shards each)."""
    from transformers import AutoModelForCausalLM

    from compiler.tiny_models import build_tiny_model, tiny_config, train_tokenizer

    root = tmp_path_factory.mktemp("stream-models")
    tok = train_tokenizer()
    src = build_tiny_model("llama", root / "src", tokenizer=tok, layers=3)
    out = {}
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        model.save_pretrained(root / name, max_shard_size="150KB")
        tok.save_pretrained(root / name)
        out[name] = root / name
    config = tiny_config("llama", vocab_size=len(tok), layers=2)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(root / "tied", max_shard_size="150KB")
    tok.save_pretrained(root / "tied")
    out["tied"] = root / "tied"
    out["one-block"] = build_tiny_model("llama", root / "one-block", tokenizer=tok, layers=1)
    return out


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compile_both(model: Path, passes: str, tmp: Path, **extra) -> tuple[dict, dict, dict]:
    results = {}
    for mode, stream in (("memory", False), ("stream", True)):
        opts = CompileOptions(model=str(model), out=tmp / mode, passes=passes, calib=CALIB, stream=stream, **extra)
        results[mode] = compile_model(opts)
    mem, st = results["memory"], results["stream"]
    assert "streaming" not in mem.report and st.report["streaming"]["streamed"] is True
    return mem.manifest, st.manifest, {"memory": mem, "stream": st}


def untimed(value):
    """The value without wall-clock entries (keys naming seconds), which differ between any two runs."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def assert_same(mem_manifest: dict, st_manifest: dict, results: dict) -> None:
    assert json.dumps(st_manifest["plan"], sort_keys=True) == json.dumps(mem_manifest["plan"], sort_keys=True)
    assert json.dumps(untimed(st_manifest["analyses"]), sort_keys=True) == json.dumps(untimed(mem_manifest["analyses"]), sort_keys=True)
    assert st_manifest["source"]["sha256"] == mem_manifest["source"]["sha256"]
    a, b = tensors_of(results["memory"].out / "model"), tensors_of(results["stream"].out / "model")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


PIPELINES = {
    "owl-wanda": "outlier-analysis,sparsity-allocation{method=owl,target=0.6},prune{method=wanda}",
    "alpha-sparsegpt-quant": "sparsity-allocation{method=alphapruning,target=0.5},prune{method=sparsegpt},quantize{scheme=int8}",
    "nm-magnitude": "sparsity-allocation{method=uniform,target=0.5},nm-structure{n=2,m=4},prune{method=magnitude},quantize{scheme=int8-dynamic}",
    "auto-wanda": "sparsity-allocation{method=auto,target=0.6,grid_lam=0.05;0.1,grid_m=5},prune{method=wanda}",
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_streamed_compile_is_bit_identical(checkpoints, tmp_path, name):
    model = checkpoints["fp16" if name in ("owl-wanda", "auto-wanda") else "fp32"]
    mem, st, results = compile_both(model, PIPELINES[name], tmp_path)
    assert_same(mem, st, results)
    assert results["stream"].report["streaming"]["overlay_writes"] >= 3  # every pruned block went through the overlay


def test_tied_embeddings_bf16_and_evaluation(checkpoints, tmp_path):
    """bf16 on disk, tied embeddings (written once); perplexity of dense and compiled streamed block-major
    equals the in-memory perplexity exactly (evaluate_pair is what --eval-data runs)."""
    from compiler.evaluate import EvalConfig, evaluate_pair
    from compiler.streaming.runner import decide, load_ir

    mem, st, results = compile_both(checkpoints["tied"], PIPELINES["owl-wanda"], tmp_path)
    assert_same(mem, st, results)
    keys = tensors_of(results["stream"].out / "model")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    cfg = EvalConfig(max_tokens=500, greedy_prompts=0)
    out = {}
    for stream in (False, True):
        dense, compiled = (load_ir(str(m), decide(str(m), stream, None)) for m in (checkpoints["tied"], results["memory"].out / "model"))
        out[stream] = evaluate_pair(dense, compiled, "eval", cfg=cfg)
    assert out[True]["compiled"] == out[False]["compiled"] and out[True]["dense"] == out[False]["dense"]
    assert out[True]["top1_agreement"] == out[False]["top1_agreement"] and out[True]["tokens"] == out[False]["tokens"] > 100


def test_streamed_artifact_loads_and_evaluates(checkpoints, tmp_path):
    """The streamed artifact is a normal HF directory; `sparsec eval` streams it to the same perplexity."""
    from transformers import AutoModelForCausalLM

    from compiler.evaluate import EvalConfig, EvalTarget, evaluate_models

    opts = CompileOptions(model=str(checkpoints["fp16"]), out=tmp_path / "a", passes=PIPELINES["owl-wanda"], calib=CALIB, stream=True)
    out = compile_model(opts).out
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) > 0.3
    cfg = EvalConfig(max_tokens=600, greedy_prompts=0)
    target = EvalTarget(str(out / "model"), None)
    streamed = evaluate_models(target, "eval", cfg, stream=True)
    in_memory = evaluate_models(target, "eval", cfg, stream=False)
    assert streamed["streamed"] and not in_memory["streamed"]
    assert streamed["compiled"] == in_memory["compiled"] and streamed["tokens"] == in_memory["tokens"]


def test_max_memory_chunks_and_refusals(checkpoints, tmp_path):
    from compiler.streaming.memory import parse_size

    assert parse_size("8GiB") == 8 << 30 and parse_size("512MiB") == 512 << 20
    with pytest.raises(SpecError, match="--max-memory"):
        parse_size("lots")
    model = str(checkpoints["fp16"])
    from compiler.streaming.runner import decide

    auto = decide(model, None, parse_size("100MB"), samples=8, seqlen=32)
    assert auto.stream and "budget" in auto.reason
    assert not decide(model, None, None, samples=8, seqlen=32).stream  # the tiny model fits this machine
    # --max-memory sizes the chunk: room for 2 samples (64 tokens) per block call of this tiny model
    from compiler.streaming.index import CheckpointIndex
    from compiler.streaming.memory import BASELINE, Shape

    index = CheckpointIndex.from_dir(model)
    block = index.nbytes(torch.float32, [k for k in index.tensors if k.startswith("model.layers.0.")])
    outer = index.nbytes(torch.float32, [k for k in index.tensors if not k.startswith("model.layers.")])
    shape = Shape(hidden=64, intermediate=128, heads=4)
    cap = block + outer + BASELINE + 2 * 8 * 32 * 64 * 4 + 70 * shape.token_working_bytes(32)
    opts = CompileOptions(model=model, out=tmp_path / "capped", passes=PIPELINES["owl-wanda"], calib=CALIB, stream=True, max_memory=cap)
    rep = compile_model(opts).report["streaming"]
    assert rep["streamed"] and rep["batch_tokens"] == 64
    with pytest.raises(SpecError, match="below the streamed estimate"):
        compile_model(CompileOptions(model=model, out=tmp_path / "tiny-cap", passes=PIPELINES["owl-wanda"], calib=CALIB,
                                     stream=True, max_memory=parse_size("100MB")))
    with pytest.raises(SpecError, match="cannot lower a streamed compile"):
        compile_model(CompileOptions(model=model, out=tmp_path / "b", passes=PIPELINES["owl-wanda"], calib=CALIB, stream=True,
                                     backends=("onnxruntime",)))
    with pytest.raises(SpecError, match="local Hugging Face directory"):
        compile_model(CompileOptions(model="tests/no-such-model", out=tmp_path / "c", calib=CALIB, stream=True))


def test_model_without_repeated_blocks_is_resident_whole(checkpoints, tmp_path):
    """One decoder layer is no repeated container: the model is one block (the root), nothing can be
    streamed, everything stays resident — and the compile and its evaluation still match memory mode."""
    from compiler.evaluate import perplexity
    from compiler.streaming.runner import decide, load_ir

    mem, st, results = compile_both(checkpoints["one-block"], PIPELINES["owl-wanda"], tmp_path)
    assert_same(mem, st, results)
    assert results["stream"].report["streaming"]["blocks_streamed"] == 0
    ids = torch.arange(300) % 500
    model = str(results["stream"].out / "model")
    values = [perplexity(load_ir(model, decide(model, s, None)).module, ids, 64, 32).value for s in (False, True)]
    assert values[0] == values[1]


def test_cli_stream_flags(checkpoints, cli):
    """`sparsec eval --stream` streams (and says so); a malformed --max-memory is a one-line error."""
    model = str(checkpoints["fp16"])
    res = cli("eval", model, "--stream", "--json", "--max-tokens", "300", "--greedy-prompts", "0")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["streamed"] is True and out["metric"] == "perplexity" and out["tokens"] == 299  # 300 ids, 299 predicted
    bad = cli("eval", model, "--max-memory", "lots")
    assert bad.exit_code != 0 and "error: --max-memory must be a size" in bad.output
