"""Lowering to ONNX: numerics vs torch on onnxruntime, pruning zeros kept, graph contract, KV cache."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from lowering_helpers import prune_half

from compiler.lowering.export import EXTERNAL_DATA_FILE, LoweringError, load_onnx, save_onnx
from compiler.lowering.feeds import lm_feeds, present_to_past
from compiler.lowering.files import MODEL_FILE, model_file
from compiler.lowering.lower import lower_artifact
from compiler.lowering.rules import explain_rejection, graph_rules, layer_nodes
from compiler.trace import load_and_trace


@pytest.fixture(scope="module")
def lowered(tiny_model_dir, tmp_path_factory):
    """arch -> (ir, artifact root, lowering section); each tiny model pruned 50% and lowered once."""
    cache = {}

    def make(arch: str):
        if arch not in cache:
            ir = load_and_trace(str(tiny_model_dir(arch)))
            prune_half(ir)
            root = tmp_path_factory.mktemp(f"lowered-{arch}")
            cache[arch] = (ir, root, lower_artifact(ir, root))
        return cache[arch]

    return make


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert", "qwen2"])
def test_lowered_graph_matches_torch_and_keeps_zeros(lowered, arch):
    ir, root, section = lowered(arch)
    model = onnx.load(str(root / MODEL_FILE))
    assert model.ir_version == 8 and section["ir_version"] == 8 and section["opset"] == 17
    assert all(rule["ok"] for rule in section["checks"])
    # numerics: padded batch of real text (+ one decode step for LMs), onnxruntime vs torch
    assert section["numerics"], "no numerics recorded"
    for output, diff in section["numerics"].items():
        assert diff < 1e-4, f"{arch}: {output} differs from torch by {diff}"
    # every pruned zero is an exact zero in the initializer that holds the layer's weight
    zeros = section["zeros"]
    assert zeros["preserved"] and zeros["torch_zeros"] > 0
    block_layers = [n for n, layer in ir.layers.items() if layer.block is not None]
    mapping = layer_nodes(model, block_layers)
    assert set(mapping) == set(block_layers)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, (_, weight) in mapping.items():
        assert int((inits[weight] == 0).sum()) == int((ir.weight(name) == 0).sum()), name


def test_encoder_contract(lowered):
    _, root, section = lowered("bert")
    assert section["task"] == "feature-extraction"
    assert section["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert section["outputs"] == ["last_hidden_state"]
    assert model_file(section, "onnxruntime") == "onnx/model.onnx"
    graph = onnx.load(str(root / MODEL_FILE)).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "sequence_length"]
    # encoders are self-contained too (optimum needs config.json to load them at all)
    assert json.loads((root / "onnx" / "config.json").read_text())["model_type"] == "bert"
    assert not (root / "onnx" / "generation_config.json").exists()
    tok_cfg = json.loads((root / "onnx" / "tokenizer_config.json").read_text())
    # the tokenizer's names that the graph takes (this generic tokenizer makes no token_type_ids)
    assert tok_cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert "is_local" not in tok_cfg and "local_files_only" not in tok_cfg


def test_variant_directories_get_the_hf_files(tiny_model_dir, tmp_path):
    """Each int8 variant directory loads on its own (`from_pretrained(ART/onnx, subfolder=VARIANT)`)."""
    ir = load_and_trace(str(tiny_model_dir("llama")))
    for name, layer in ir.layers.items():
        if layer.block is not None:
            ir.plan[name].quant = "int8-dynamic"
    section = lower_artifact(ir, tmp_path, backends=("onnxruntime",))
    variant_dir = (tmp_path / section["backend_files"]["onnxruntime"]).parent
    assert variant_dir != tmp_path / "onnx"
    for name in section["hf_files"]:
        assert (variant_dir / name).read_bytes() == (tmp_path / "onnx" / name).read_bytes(), name


def test_portable_config_keeps_scaled_and_per_layer_rope():
    from compiler.lowering.hf_files import portable_config, portable_tokenizer_config

    scaled = portable_config({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}, causal=True)
    assert scaled["rope_theta"] == 5e5 and scaled["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert scaled["use_cache"] is True
    per_layer = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    assert portable_config(per_layer, causal=False) == per_layer  # nothing invented for per-layer-type RoPE
    assert portable_tokenizer_config({"tokenizer_class": "BertTokenizer"}, [])["tokenizer_class"] == "BertTokenizer"


def test_causal_lm_contract_and_optimum_layout(lowered):
    ir, root, section = lowered("llama")
    layers = ir.config.num_hidden_layers
    assert section["task"] == "text-generation"
    assert section["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert section["inputs"][3:] == [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    assert section["outputs"] == ["logits"] + [f"present.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    assert section["kv"]["layers"] == layers
    onnx_dir = root / "onnx"
    config = json.loads((onnx_dir / "config.json").read_text())
    assert config["use_cache"] is True and config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    # RoPE in both forms: transformers 5's rope_parameters and 4.x's rope_theta / rope_scaling
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["rope_scaling"] is None
    assert (onnx_dir / "tokenizer.json").is_file() and (onnx_dir / "generation_config.json").is_file()
    tok_cfg = json.loads((onnx_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # not 5.x's TokenizersBackend
    assert tok_cfg["model_input_names"] == ["input_ids", "attention_mask"]  # what the graph takes
    assert section["hf_files"] == sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"])
    # transformers 5 reads the portable files back as the model's own
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(onnx_dir).rope_parameters == ir.config.rope_parameters
    text = "def parse(text): return text"
    assert AutoTokenizer.from_pretrained(onnx_dir)(text)["input_ids"] == ir.tokenizer(text)["input_ids"]


def test_kv_cache_greedy_decoding_matches_torch(lowered):
    """Prefill + 6 decode steps through the ONNX graph's KV cache give torch's greedy tokens."""
    import onnxruntime as ort

    ir, root, section = lowered("llama")
    sess = ort.InferenceSession(str(root / MODEL_FILE), providers=["CPUExecutionProvider"])
    prompt = ir.tokenizer("def parse(text):", return_tensors="np")["input_ids"].astype(np.int64)
    with torch.no_grad():
        expected = ir.module.generate(torch.from_numpy(prompt), max_new_tokens=6, do_sample=False,
                                      pad_token_id=ir.config.pad_token_id)[0, prompt.shape[1]:].tolist()
    ids, mask, past, got = prompt, np.ones_like(prompt), None, []
    for _ in range(6):
        out = dict(zip(section["outputs"], sess.run(None, lm_feeds(section, ids, mask, past))))
        nxt = int(out["logits"][0, -1].argmax())
        got.append(nxt)
        past = present_to_past(out)
        ids = np.array([[nxt]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
    assert got == expected


def test_plain_module_lowering(tmp_path):
    from compiler.trace import LoadedModel, trace

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    ir = trace(LoadedModel(module, "module", example_inputs={"input": torch.randn(3, 16)}), source="seq")
    prune_half(ir)
    section = lower_artifact(ir, tmp_path)
    assert section["task"] == "module" and section["inputs"] == ["input"] and section["outputs"] == ["output"]
    assert section["numerics"]["output"] < 1e-5 and section["zeros"]["preserved"]


def test_external_data_roundtrip(tmp_path, lowered):
    """Models above 1.5 GB keep their weights beside the graph; onnxruntime loads them from there."""
    import onnxruntime as ort

    _, root, section = lowered("bert")
    model = load_onnx(root / MODEL_FILE)
    target = tmp_path / "big" / "model.onnx"
    save_onnx(model, target, external=True)
    assert (target.parent / EXTERNAL_DATA_FILE).stat().st_size > target.stat().st_size
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    a = ort.InferenceSession(str(root / MODEL_FILE)).run(None, feeds)[0]
    b = ort.InferenceSession(str(target)).run(None, feeds)[0]
    np.testing.assert_array_equal(a, b)


def test_rules_name_what_a_runtime_rejects(tmp_path, lowered):
    from runtimes.base import RunnerOptions
    from runtimes.onnxruntime_backend import OnnxRuntimeBackend

    _, root, _ = lowered("bert")
    model = onnx.load(str(root / MODEL_FILE))
    model.ir_version = 10
    model.opset_import.add(domain="ai.stray", version=1)
    assert {r["rule"] for r in graph_rules(model) if not r["ok"]} == {"ir_version <= 9", "no stray opset domains"}
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(LoweringError) as err:
        OnnxRuntimeBackend().runner(bad, RunnerOptions())
    message = str(err.value)
    assert "onnxruntime rejected" in message and "not even loadable by onnx" in message
    assert "\n" not in explain_rejection("x", bad, RuntimeError("line one\nline two")).one_line()
