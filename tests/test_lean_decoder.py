"""The lean decoder host (runtimes/kernels/lean_decoder.py, csrc/decoder_ops.cpp): its three ops against
torch on every ISA path the CPU has, and whole tiny Llama / Qwen2 / Mistral models against Hugging Face's
modules — fp32 logits within 1e-4 and identical greedy tokens, batches of prompts of different lengths
equal to each prompt alone, int8 within its quantization error with every packed layer reported run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from runtimes.kernels.ops import available_isas, forced_isa, ops
from tests.test_kernels_host import make_artifact


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _reference_attention(qkv, cache_k, cache_v, starts, cos, sin, heads, kv_heads, scale):
    """What rope_attention computes, in torch: rotate, write the cache, causal GQA over each row's prefix."""
    b, t, _ = qkv.shape
    d = cache_k.shape[-1]
    q, k, v = qkv.view(b, t, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=2)
    out = torch.zeros(b, t, heads, d)
    for r in range(b):
        pos = torch.arange(int(starts[r]), int(starts[r]) + t)
        cache_k[r, :, pos] = _rotate(k[r], cos[pos][:, None], sin[pos][:, None]).transpose(0, 1)
        cache_v[r, :, pos] = v[r].transpose(0, 1)
        qr = _rotate(q[r], cos[pos][:, None], sin[pos][:, None])
        for i, p in enumerate(pos.tolist()):
            keys = cache_k[r, :, : p + 1].repeat_interleave(heads // kv_heads, dim=0)
            vals = cache_v[r, :, : p + 1].repeat_interleave(heads // kv_heads, dim=0)
            w = torch.softmax((keys @ qr[i][:, :, None]).squeeze(-1) * scale, dim=-1)
            out[r, i] = (w[:, None, :] @ vals).squeeze(1)
    return out.reshape(b, t, heads * d)


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("tokens", [1, 5])
def test_ops_match_torch(isa, tokens):
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, d, cap = 6, 2, 18, 40  # head_dim not a multiple of 16: the vector loops' tails run
    qkv = torch.randn(3, tokens, (heads + 2 * kv_heads) * d, generator=gen)
    freqs = torch.outer(torch.arange(64.0), 1.0 / (100.0 ** (torch.arange(0, d, 2) / d)))
    cos, sin = freqs.cos().contiguous(), freqs.sin().contiguous()
    starts = torch.tensor([0, 7, 30], dtype=torch.int64)
    ck, cv = torch.randn(3, kv_heads, cap, d, generator=gen), torch.randn(3, kv_heads, cap, d, generator=gen)
    rk, rv = ck.clone(), cv.clone()
    x, delta = (torch.randn(3, tokens, 70, generator=gen) * 3 for _ in range(2))
    w = torch.randn(70, generator=gen)
    gu = torch.randn(3, tokens, 2 * 83, generator=gen) * 4
    with forced_isa(isa):
        got = ops().rope_attention(qkv, ck, cv, starts, cos, sin, heads, kv_heads, 0.3)
        x_ours = x.clone()
        normed = ops().add_rms_norm(x_ours, delta, w, 1e-5)
        act = ops().silu_mul(gu)
    want = _reference_attention(qkv, rk, rv, starts, cos, sin, heads, kv_heads, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ck, rk, rtol=1e-6, atol=1e-6)  # keys rotated in place, other slots untouched
    torch.testing.assert_close(cv, rv, rtol=0, atol=0)
    torch.testing.assert_close(x_ours, x + delta)  # the residual stream is updated in place
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (70,), w, 1e-5), rtol=1e-5, atol=1e-5)
    g, u = gu.split(83, dim=-1)
    torch.testing.assert_close(act, F.silu(g) * u, rtol=1e-5, atol=1e-5)


def test_ops_refuse_a_position_beyond_the_cache():
    qkv = torch.zeros(1, 1, 4 * 8)
    cache = torch.zeros(1, 1, 4, 8)
    table = torch.zeros(16, 4)
    with pytest.raises(RuntimeError, match="beyond the cache"):
        ops().rope_attention(qkv, cache, cache.clone(), torch.tensor([4]), table, table, 2, 1, 1.0)


def _lean(art: Path):
    from runtimes.kernels.lean_decoder import lean_host
    from runtimes.kernels.torch_host import load_host_model

    host = load_host_model(art)
    lean, why = lean_host(host)
    assert lean is not None, why
    return host, lean


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lean_fp32_reproduces_hugging_face(arch, tiny_model_dir, tmp_path):
    from runtimes.kernels.lean_decoder import LeanCache, lean_logits
    from runtimes.kernels.pack import pack_artifact

    art, ref = make_artifact(tiny_model_dir(arch), tmp_path / "art", quant=None)
    pack_artifact(art, lm_head="none")
    host, lean = _lean(art)
    prompts = [np.array([5, 17, 33, 8, 41, 9, 2]), np.array([12, 3]), np.array([40, 41, 42, 43, 44])]
    for p in prompts:  # prefill logits at every position
        with torch.no_grad():
            want = ref(torch.from_numpy(p)[None]).logits[0].numpy()
        got = lean_logits(lean, p[None], np.ones((1, len(p)), dtype=np.int64))[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # a batch: every row decodes together at its own length, rows leave as they finish
    from runtimes.decode.loop import GenRequest, SamplingParams, generate

    steps = [9, 4, 12]
    requests = [GenRequest(list(p), SamplingParams(max_tokens=n)) for p, n in zip(prompts, steps)]
    results, _ = generate(LeanCache(lean, prompts, 7 + 12), requests, eos_ids=())
    for p, n, result in zip(prompts, steps, results):
        with torch.no_grad():
            want = ref.generate(torch.from_numpy(p)[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist()
        assert list(result.tokens) == want
    assert set(host.layers_run()) == set(host.packed)  # fused q/k/v and gate/up count for their members


def test_lean_int8_within_quantization_error(tiny_model_dir, tmp_path):
    from runtimes.kernels.lean_decoder import lean_logits
    from runtimes.kernels.pack import pack_artifact

    art, ref = make_artifact(tiny_model_dir("llama"), tmp_path / "art", quant="int8")
    pack_artifact(art)
    host, lean = _lean(art)
    ids = np.array([[5, 17, 33, 8, 41, 9, 2, 77, 13, 6]])
    with torch.no_grad():
        hf = host.model(torch.from_numpy(ids)).logits[0]
        fp32 = ref(torch.from_numpy(ids)).logits[0]
    host.reset_counters()
    got = torch.from_numpy(lean_logits(lean, ids, np.ones_like(ids))[0])
    # the same kernels as the Hugging Face host; only the norms', rotary's and attention's summation order differ
    assert F.cosine_similarity(got, hf, dim=-1).min() >= 0.999
    assert F.cosine_similarity(got, fp32, dim=-1).min() >= 0.99
    assert set(host.layers_run().values()) == {"sparse-int8", "dense-int8"}
    assert set(host.layers_run()) == set(host.packed)


def test_host_choice_and_fallbacks(tiny_model_dir, tmp_path, monkeypatch):
    from runtimes.kernels.host_runner import HostDecoder
    from runtimes.kernels.lean_decoder import host_choice
    from runtimes.kernels.pack import pack_artifact

    art, _ = make_artifact(tiny_model_dir("llama"), tmp_path / "llama", quant="int8")
    pack_artifact(art)
    dec = HostDecoder(art / "sparsec", threads=1)
    assert dec.details["host"].startswith("lean decoder") and dec.cache.startswith("in-place")
    assert dec.check_request(250, 10) == "250 + 10 tokens exceed the model's 256 positions"
    assert dec.check_request(10, 10) is None
    monkeypatch.setenv("SPARSEC_HOST", "hf")
    forced = HostDecoder(art / "sparsec", threads=1)
    assert forced.details["host"] == "hugging face modules (SPARSEC_HOST=hf)" and forced.cache.startswith("dynamic")
    assert HostDecoder(art / "sparsec", threads=1, lean=False).details["host"] == "hugging face modules (cache=dynamic)"
    ids = np.array([[5, 17, 33, 8]])
    assert dec.generate(ids, np.ones_like(ids), 6).tokens[:1] == forced.generate(ids, np.ones_like(ids), 6).tokens[:1]
    monkeypatch.setenv("SPARSEC_HOST", "fast")
    with pytest.raises(ValueError, match="SPARSEC_HOST must be 'auto' or 'hf'"):
        host_choice()
    monkeypatch.delenv("SPARSEC_HOST")
    gpt2, _ = make_artifact(tiny_model_dir("gpt2"), tmp_path / "gpt2", quant="int8")
    pack_artifact(gpt2)
    other = HostDecoder(gpt2 / "sparsec", threads=1)
    assert other.details["host"].startswith("hugging face modules (model type 'gpt2'")
