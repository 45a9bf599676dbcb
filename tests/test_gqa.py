"""The fused decode graph (compiler/lowering/gqa.py) and its in-place decoder (runtimes/decode/onnxruntime_gqa.py):
same logits and greedy tokens as the torch model for every architecture it accepts, a one-line reason for
the ones it does not, and the planned layers found by scope so the int8/int4 variants are written from it."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import numpy as np
import onnx
import pytest

from compiler.errors import SparsecError

NEW = 10


def _ir(tiny_model_dir, arch: str):
    from compiler.trace import load_and_trace

    return load_and_trace(str(tiny_model_dir(arch)))


def _lowering(layout) -> dict:
    return {"task": "text-generation",
            "inputs": ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{t}" for i in range(layout.layers)
                                                         for t in ("key", "value")],
            "kv": layout.kv.to_dict(), "decode_graph": {"positions": layout.positions}}


def _decoder(path: Path, layout):
    from runtimes.decode.decoders import DecodeOptions
    from runtimes.decode.onnxruntime_gqa import GQADecoder
    from runtimes.onnxruntime_backend import OnnxRuntimeBackend

    return GQADecoder(OnnxRuntimeBackend(), path, _lowering(layout), DecodeOptions(prompt_len=32, new_tokens=NEW, threads=1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_graph_matches_torch(tiny_model_dir, tmp_path, arch):
    """Logits and cache of the fused graph equal torch's (prefill + a decode step); greedy tokens of the
    in-place decoder equal torch's greedy tokens; every projection is mapped to its MatMul by scope."""
    from compiler.lowering.export import graph_spec
    from compiler.lowering.gqa import export_gqa, gqa_layout, gqa_numerics
    from compiler.lowering.rules import layer_nodes
    from runtimes.decode.decoders import torch_greedy

    ir = _ir(tiny_model_dir, arch)
    layout = gqa_layout(ir.module)
    assert not isinstance(layout, str), layout
    path = tmp_path / "decode_gqa.onnx"
    export_gqa(ir, path, layout)
    ids = np.random.default_rng(1).integers(6, 500, size=(1, 17))
    numerics = gqa_numerics(ir, graph_spec(ir), path, ids)
    assert numerics["logits"] < 1e-4 and numerics["present"] < 1e-4, numerics
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == layout.layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layout.layers
    assert set(layer_nodes(model, list(ir.layers))) == set(ir.layers)
    with closing(_decoder(path, layout)) as dec:
        trace = dec.generate(ids, np.ones_like(ids), NEW)
    assert trace.tokens == torch_greedy(tiny_model_dir(arch), ids, np.ones_like(ids), NEW)
    assert len(trace.step_ms) == NEW - 1


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures_get_a_reason(tiny_model_dir, arch):
    from compiler.lowering.gqa import gqa_layout

    reason = gqa_layout(_ir(tiny_model_dir, arch).module)
    assert isinstance(reason, str) and f"'{arch}'" in reason


def test_decoder_strips_padding_and_decodes_batches(tiny_model_dir, tmp_path):
    """A left-padded prompt decodes as the bare prompt; prefill logits of a padded batch equal each row's
    own, zeros at the padding; a batch of requests of different lengths and budgets (rows leaving the batch
    as they finish) gives each request's tokens when run alone; too many tokens: a one-line error."""
    from compiler.lowering.gqa import export_gqa, gqa_layout
    from runtimes.decode.loop import GenRequest, SamplingParams

    ir = _ir(tiny_model_dir, "llama")
    layout = gqa_layout(ir.module)
    path = tmp_path / "decode_gqa.onnx"
    export_gqa(ir, path, layout)
    rng = np.random.default_rng(3)
    short, long = rng.integers(6, 500, size=(1, 6)), rng.integers(6, 500, size=(1, 9))
    padded = np.concatenate([np.zeros((1, 3), dtype=short.dtype), short], axis=1)
    pad_mask = np.concatenate([np.zeros((1, 3), dtype=np.int64), np.ones((1, 6), dtype=np.int64)], axis=1)
    with closing(_decoder(path, layout)) as dec:
        bare = dec.generate(short, np.ones_like(short), NEW).tokens
        assert dec.generate(padded, pad_mask, NEW).tokens == bare
        batch = dec.prefill_logits(np.concatenate([padded, long]), np.concatenate([pad_mask, np.ones_like(long)]))
        np.testing.assert_allclose(batch[0, 3:], dec.prefill_logits(short, np.ones_like(short))[0], atol=1e-5)
        np.testing.assert_allclose(batch[1], dec.prefill_logits(long, np.ones_like(long))[0], atol=1e-5)
        assert not batch[0, :3].any()
        requests = [GenRequest(rng.integers(6, 500, size=n).tolist(), SamplingParams(max_tokens=b))
                    for n, b in ((5, 3), (11, 9), (8, 6), (2, 9))]
        together = [list(r.tokens) for r in dec.complete(requests, pad_id=0, eos_ids=())]
        alone = [list(dec.complete([r], pad_id=0, eos_ids=())[0].tokens) for r in requests]
        assert together == alone and [len(t) for t in together] == [3, 9, 6, 9]
        assert "exceed" in dec.check_request(layout.positions, 1)
        with pytest.raises(SparsecError, match="positions"):
            dec.generate(long, np.ones_like(long), layout.positions)
