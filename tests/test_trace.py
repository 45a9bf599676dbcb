"""Structure discovery on many architectures, a plain user module, and the real MiniLM."""

import pytest
import torch
from torch import nn

from compiler.errors import ModelLoadError
from compiler.trace import load_and_trace, load_model

ARCH_BLOCKS = {
    "llama": ("model.layers", 7),
    "mistral": ("model.layers", 7),
    "qwen2": ("model.layers", 7),
    "opt": ("model.decoder.layers", 6),
    "gpt2": ("transformer.h", 4),
    "bert": ("encoder.layer", 6),
}


@pytest.mark.parametrize("arch", sorted(ARCH_BLOCKS))
def test_tiny_hf_structure(tiny_model_dir, arch):
    ir = load_and_trace(str(tiny_model_dir(arch)))
    prefix, per_block = ARCH_BLOCKS[arch]
    assert [b.name for b in ir.blocks] == [f"{prefix}.0", f"{prefix}.1"]
    for block in ir.blocks:
        assert len(block.layers) == per_block
        assert all(ir.layers[n].block == block.index for n in block.layers)
    outside = [n for n, l in ir.layers.items() if l.block is None]
    assert outside == (["pooler.dense"] if arch == "bert" else ["lm_head"])
    assert ir.model_type == ("encoder" if arch == "bert" else "causal-lm")


def test_execution_order_follows_forward(tiny_model_dir):
    ir = load_and_trace(str(tiny_model_dir("llama")))
    names = [n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in ir.blocks[0].layers]
    assert names[:3] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert names[-1] == "mlp.down_proj"


def test_gpt2_conv1d_is_seen_as_out_by_in(tiny_model_dir):
    ir = load_and_trace(str(tiny_model_dir("gpt2")))
    c_fc = next(n for n in ir.layers if n.endswith("mlp.c_fc"))
    layer = ir.layers[c_fc]
    assert layer.kind == "conv1d"
    assert (layer.out_features, layer.in_features) == (128, 64)
    assert ir.weight(c_fc).shape == (128, 64)


class UserNet(nn.Module):
    """A plain user module: no ModuleList of blocks, a conv and two linears."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def user_factory():
    torch.manual_seed(0)
    return UserNet(), torch.randn(2, 3, 8, 8)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


def stack_factory():
    return {"model": Stack(), "example_inputs": {"input": torch.randn(4, 16)}}


def test_plain_module_is_one_block_in_execution_order():
    ir = load_and_trace("tests.test_trace:user_factory")
    assert len(ir.blocks) == 1 and ir.blocks[0].name == ""
    assert list(ir.layers) == ["conv", "head.0", "head.2"]
    assert ir.layers["conv"].kind == "conv2d" and ir.layers["conv"].in_features == 27


def test_user_module_with_repeated_blocks():
    ir = load_and_trace("tests.test_trace:stack_factory")
    assert [b.name for b in ir.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert ir.layers["out"].block is None


def test_real_minilm(minilm_dir):
    ir = load_and_trace("minilm")
    assert ir.model_type == "encoder" and len(ir.blocks) == 6
    assert ir.prunable_params() == 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384  # 6 blocks + pooler
    assert ir.tokenizer is not None


@pytest.mark.parametrize("model, fragment", [
    ("/no/such/dir", "not found"),
    ("tests", "without config.json"),
    ("tests/test_trace.py", "is a file, not a model"),
    ("tests.test_trace:nothing_here", "is not a callable"),
    ("no_such_module_xyz:factory", "cannot import"),
])
def test_bad_models(model, fragment):
    with pytest.raises(ModelLoadError) as err:
        load_model(model)
    assert fragment in str(err.value)


def test_hub_id_goes_through_from_pretrained_and_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"from the local Hugging Face cache only \(HF_HUB_OFFLINE is set"):
        load_model("some-org/some-model-that-is-not-cached")
