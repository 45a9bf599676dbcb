"""sparsec's own kernels vs dense references, on every ISA path this CPU has (issue 12).

int8: the int32 accumulations are compared exactly; fp32 within 1e-5 of the output scale.
Shapes include in_features not a multiple of 64, and sparsity 0 / 50 / 90 / 100 % plus all-zero rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_helpers import ISAS, SHAPES, SPARSITIES, sparse_weight

from runtimes.kernels import ops
from runtimes.kernels.format import load_packed, pack_linear, save_packed, unpack_dense
from runtimes.kernels.modules import PackedLinearModule

TOKENS = [1, 2, 5, 8, 11, 33]


@pytest.fixture(params=ISAS)
def isa(request):
    with ops.forced_isa(request.param):
        yield request.param



def test_every_path_of_this_cpu_is_exercised():
    assert "portable" in ISAS
    if "avx512" in ISAS:
        assert "avx2" in ISAS  # the x86 paths nest


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int8_accumulation_is_exact(isa, n, k, sparsity):
    w = sparse_weight(n, k, sparsity, seed=n * 1000 + k)
    o = ops.ops()
    sp = pack_linear(w, "sparse-int8")
    de = pack_linear(w, "dense-int8")
    q = torch.round(unpack_dense(sp) / sp.tensors["scales"][:, None]).to(torch.int64)
    for m in TOKENS:
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(m))
        ref = xq.to(torch.int64) @ q.T
        got = o.sparse_i8_acc(xq, sp.tensors["masks"], sp.tensors["tile_ptr"], sp.tensors["values"], sp.tensors["rowsum"], n)
        assert torch.equal(got.to(torch.int64), ref), (isa, m)
        got_dense = o.dense_i8_acc(xq, de.tensors["q"], de.tensors["rowsum"], n)
        assert torch.equal(got_dense.to(torch.int64), ref), (isa, m)


def _quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.round(x / safe[:, None]).clamp(-127, 127)
    return torch.where(scale[:, None] > 0, xq, torch.zeros_like(xq)).to(torch.int64), scale


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int8_linear_matches_its_quantized_reference(isa, n, k, sparsity):
    w = sparse_weight(n, k, sparsity, seed=7 + n + k)
    bias = torch.randn(n)
    for kind in ("sparse-int8", "dense-int8"):
        p = pack_linear(w, kind, bias)
        mod = PackedLinearModule(p)
        q = torch.round(unpack_dense(p) / p.tensors["scales"][:, None]).to(torch.int64)
        for m in (1, 3, 9, 40):  # 40 tokens: the int8 GEMM path (ops.cpp kInt8GemmM)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            xq, sx = _quantize_tokens(x)
            ref = (xq @ q.T).to(torch.float32) * (sx[:, None] * p.tensors["scales"][None, :]) + bias
            torch.testing.assert_close(mod(x), ref, rtol=1e-6, atol=1e-6)
            # and within the rounding bound of the fp32 layer: each activation moves by <= max|x|/254,
            # each weight by <= max|w_row|/254, so |err| <= (max|x| sum|w| + max|w_row| sum|x|) / 254 (+ fp32 slack)
            full = x @ w.T + bias
            bound = (x.abs().amax(1, keepdim=True) * w.abs().sum(1) + w.abs().amax(1) * x.abs().sum(1, keepdim=True)) / 254
            assert ((mod(x) - full).abs() <= bound * 1.01 + 1e-4).all()


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_fp32_matches_dense_within_1e5(isa, n, k, sparsity):
    w = sparse_weight(n, k, sparsity, seed=3 * n + k)
    bias = torch.randn(n)
    mod = PackedLinearModule(pack_linear(w, "sparse-fp32", bias))
    for m in TOKENS + [40]:  # 40 > 32 takes the densify + GEMM path
        x = torch.randn(2, m, k)  # leading dims are kept
        ref = (x.double() @ w.double().T + bias.double())
        got = mod(x)
        assert got.shape == (2, m, n)
        scale = ref.abs().max().item() + 1e-30
        assert (got.double() - ref).abs().max().item() <= 1e-5 * scale, (isa, m)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_bf16_matches_its_rounded_weight_within_1e5(isa, n, k, sparsity):
    """bf16 values: the weight rounded to bfloat16 once at packing, fp32 activations and sums; sparse and
    dense kinds agree with x @ W_bf16^T in float64 to 1e-5 of the output scale (batch 1, small M, and the
    GEMM path above 16 tokens)."""
    w = sparse_weight(n, k, sparsity, seed=5 * n + k)
    bias = torch.randn(n)
    w16 = w.to(torch.bfloat16).to(torch.float64)
    for kind in ("sparse-bf16", "dense-bf16"):
        p = pack_linear(w, kind, bias)
        assert torch.equal(unpack_dense(p).double(), w16)
        mod = PackedLinearModule(p)
        for m in TOKENS + [40]:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            ref = x.double() @ w16.T + bias.double()
            scale = ref.abs().max().item() + 1e-30
            assert (mod(x).double() - ref).abs().max().item() <= 1e-5 * scale, (isa, kind, m)


def test_bf16_packs_half_the_bytes_of_fp32():
    w = sparse_weight(256, 512, 0.7, seed=2)
    sp16, sp32 = pack_linear(w, "sparse-bf16"), pack_linear(w, "sparse-fp32")
    assert sp16.nnz == sp32.nnz and sp16.tensors["values"].dtype == torch.bfloat16
    mask_bytes = sp16.tensors["masks"].numel() * 8 + sp16.tensors["tile_ptr"].numel() * 8
    assert sp16.bytes_read() == 2 * sp16.nnz + mask_bytes and sp32.bytes_read() == 4 * sp32.nnz + mask_bytes
    assert pack_linear(w, "dense-bf16").stored_bytes() == 2 * 256 * 512


def test_zero_activations_and_all_zero_weight():
    w = torch.zeros(10, 70)
    for kind in ("sparse-int8", "sparse-fp32", "dense-int8", "sparse-bf16", "dense-bf16"):
        mod = PackedLinearModule(pack_linear(w, kind, torch.arange(10.0)))
        for x in (torch.zeros(1, 70), torch.randn(3, 70)):
            assert torch.equal(mod(x), torch.arange(10.0).expand(x.shape[0], 10))


def test_pack_save_load_round_trip_without_densifying(tmp_path):
    w = sparse_weight(300, 200, 0.7, seed=1)
    layers = {"a.proj": pack_linear(w, "sparse-int8", torch.randn(300)), "b": pack_linear(w, "sparse-fp32"),
              "head": pack_linear(w, "dense-int8"), "c": pack_linear(w, "sparse-bf16"), "d": pack_linear(w, "dense-bf16")}
    path = save_packed(layers, tmp_path / "w.safetensors")
    back = load_packed(path)
    assert set(back) == set(layers)
    for name, p in layers.items():
        q = back[name]
        assert (q.kind, q.out_features, q.in_features) == (p.kind, p.out_features, p.in_features)
        assert set(q.tensors) == set(p.tensors)
        for f in p.tensors:
            assert torch.equal(q.tensors[f], p.tensors[f])
        # nothing dense was built: every array is the packed one, the sparse ones far below out x in
        assert q.stored_bytes() == p.stored_bytes()
    assert torch.equal(back["a.proj"].bias, layers["a.proj"].bias)
    sp = back["a.proj"]
    assert max(t.numel() for t in sp.tensors.values()) < 0.4 * 300 * 200
    # exactly: 1 B per non-zero (+64 B padding), 8 B of mask per 64 columns, tile_ptr per 4 rows, scale and rowsum per row
    assert sp.stored_bytes() == sp.nnz + 64 + 300 * 4 * 8 + 76 * 8 + 300 * 4 + 300 * 4
    assert sp.nnz < 0.35 * 300 * 200
    assert path.stat().st_size < 1.1 * sum(p.stored_bytes() + 4 * p.out_features for p in layers.values()) + 4096


def test_bad_arguments_are_one_line_errors():
    o = ops.ops()
    p = pack_linear(sparse_weight(8, 64, 0.5, 0), "sparse-int8")
    with pytest.raises(RuntimeError, match="error: masks must be"):
        o.sparse_linear_i8(torch.randn(1, 128), p.tensors["masks"], p.tensors["tile_ptr"], p.tensors["values"],
                           p.tensors["scales"], p.tensors["rowsum"], None, 8)
    with pytest.raises(RuntimeError, match="error: unknown kernel ISA"):
        ops.set_isa("sse9")
    with pytest.raises(ValueError, match="unknown packed kind"):
        pack_linear(torch.zeros(2, 2), "int3")


def test_environment_variable_forces_the_path():
    code = "from runtimes.kernels import ops; print(ops.isa())"
    env = {**os.environ, "SPARSEC_KERNEL_ISA": "portable"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"
    # an unknown value goes through the same check as set_isa (test_bad_arguments_are_one_line_errors)


def test_activation_rounding_is_half_to_even(isa):
    """Per-token int8 quantization (csrc/row_math.h) rounds x / scale half to even, like torch.round: with
    max|x| = 127 the scale is 1, and an identity weight returns the quantized activations themselves."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, -126.5] + [0.0] * 8])
    layer = PackedLinearModule(pack_linear(torch.eye(16), "dense-int8", None))
    got = layer(x)
    torch.testing.assert_close(got, torch.round(x), rtol=0, atol=1e-5)
    assert got[0, :8].tolist() == [127.0, 0.0, 2.0, 2.0, 0.0, -2.0, 3.0, -126.0]
