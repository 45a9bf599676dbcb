"""int4 values in the packed format (sparse-int4, dense-int4) vs numpy/torch references, on every ISA path
this CPU has (issue 12).

The integer accumulation is checked exactly: with unit scales the kernels' output is the integer dot
product of the int8 activations and the int4 levels u - z (asymmetric, group 64) the layer stores. The linear op is
checked against the same quantized values in float64 (fp32 summation slack only) and against the fp32
layer within the int4 + int8 rounding bound. Shapes include in_features not a multiple of 64, sparsity
0 / 50 / 90 / 100 % and all-zero rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_helpers import ISAS, SHAPES, SPARSITIES, sparse_weight

from runtimes.kernels import ops
from runtimes.kernels.format import CHUNK, int4_dense_levels, load_packed, pack_linear, quantize_int4, save_packed, unpack_dense
from runtimes.kernels.modules import PackedLinearModule

TOKENS = [1, 2, 5, 9, 33]


@pytest.fixture(params=ISAS)
def isa(request):
    with ops.forced_isa(request.param):
        yield request.param


INT4_KINDS = ("sparse-int4", "dense-int4")


def _acc(p, xq: torch.Tensor, scales: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    o, n, t = ops.ops(), p.out_features, p.tensors
    if p.kind == "sparse-int4":
        return o.sparse_i4_acc(xq, t["masks"], t["tile_ptr"], t["values"], scales, t["zeros"], comp, n)
    return o.dense_i4_acc(xq, t["q"], scales, t["zeros"], comp, n)


def _numpy_levels(w: torch.Tensor, kind: str) -> np.ndarray:
    """The int4 levels of `w` recomputed in numpy from their definition (independent of the packer's bit
    layout): per 64-column group lo = min(w, 0), hi = max(w, 0), s = fp16((hi - lo) / 15),
    z = clip(round(-lo / s), 0, 15), u = clip(round(w / s) + z, 0, 15), level = u - z; 0 where the weight
    is pruned (sparse) — the integers the kernels must multiply."""
    a = w.numpy().astype(np.float32)
    n, k = a.shape
    kp = -(-k // CHUNK) * CHUNK
    pad = np.zeros((n, kp), np.float32)
    pad[:, :k] = a
    g = pad.reshape(n, kp // CHUNK, CHUNK)
    lo, hi = np.minimum(g.min(axis=2), 0), np.maximum(g.max(axis=2), 0)
    s = ((hi - lo) / np.float32(15)).astype(np.float16).astype(np.float32)
    safe = np.where(s > 0, s, 1.0).astype(np.float32)
    z = np.clip(np.round(-lo / safe), 0, 15)
    u = np.clip(np.round(g / safe[:, :, None]) + z[:, :, None], 0, 15)
    levels = (u - z[:, :, None]).astype(np.int64).reshape(n, kp)
    if kind == "sparse-int4":
        levels = np.where(pad != 0, levels, 0)
    return levels


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int4_accumulation_is_exact(isa, n, k, sparsity):
    w = sparse_weight(n, k, sparsity, seed=n * 1000 + k)
    for kind in INT4_KINDS:
        p = pack_linear(w, kind)
        levels = _numpy_levels(w, kind)
        # the packer stores exactly these integers (and zero for every pruned weight)
        packed_levels, _ = int4_dense_levels(p)
        assert np.array_equal(packed_levels.numpy().astype(np.int64), levels), kind
        ones = torch.ones_like(p.tensors["scales"])
        comp = torch.from_numpy((128 * levels.sum(axis=1)).astype(np.float32))  # the +128 term, unit scales
        for m in TOKENS:
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(m))
            ref = xq.numpy().astype(np.int64) @ levels[:, :k].T
            got = _acc(p, xq, ones, comp)
            assert np.array_equal(got.numpy().astype(np.int64), ref), (isa, kind, m)


def _quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.round(x / safe[:, None]).clamp(-127, 127)
    return torch.where(scale[:, None] > 0, xq, torch.zeros_like(xq)).to(torch.int64), scale


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int4_linear_matches_its_quantized_reference(isa, n, k, sparsity):
    w = sparse_weight(n, k, sparsity, seed=7 + n + k)
    bias = torch.randn(n)
    for kind in INT4_KINDS:
        p = pack_linear(w, kind, bias)
        mod = PackedLinearModule(p)
        levels, scales = (t.to(torch.float64) for t in int4_dense_levels(p))
        kc = p.chunks
        for m in (1, 5, 33):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            xq, sx = _quantize_tokens(x)
            xp = torch.zeros(m, kc * CHUNK, dtype=torch.float64)
            xp[:, :k] = xq.to(torch.float64)
            dots = torch.einsum("tcj,ncj->tnc", xp.view(m, kc, CHUNK), levels.view(-1, kc, CHUNK))
            ref = (dots * scales[None]).sum(-1) * sx.double()[:, None] + bias.double()
            # fp32 slack: the AVX-512 path sums (x + 128) * level and subtracts the +128 term at the end
            mag = torch.einsum("tcj,ncj->tnc", xp.abs().view(m, kc, CHUNK) + 128, levels.abs().view(-1, kc, CHUNK))
            slack = 2e-6 * (mag * scales[None]).sum(-1) * sx.double()[:, None] + 1e-5
            got = mod(x).double()
            assert ((got - ref).abs() <= slack).all(), (isa, kind, m, (got - ref).abs().max().item())
            # and within the rounding bound of the fp32 layer: weights move by <= s / 2 (half a level step),
            # activations by <= max|x| / 254
            full = x.double() @ w.double().T + bias.double()
            wq = unpack_dense(p).double()
            s_col = scales.repeat_interleave(CHUNK, dim=1)[:, :k]
            bound = (x.double().abs() @ s_col.T / 2
                     + x.double().abs().amax(1, keepdim=True) * wq.abs().sum(1) / 254)
            assert ((got - full).abs() <= bound * 1.01 + slack + 1e-4).all(), (isa, kind, m)


def test_int4_quantizer_error_and_exact_zeros():
    w = sparse_weight(64, 256, 0.5, seed=3)
    u, s, z = quantize_int4(w)
    assert u.dtype == torch.uint8 and int(u.max()) <= 15 and s.dtype == torch.float16 and int(z.max()) <= 15
    for kind in INT4_KINDS:
        dense = unpack_dense(pack_linear(w, kind))
        err = (dense - w).abs()
        # half a level step: |w - s (u - z)| <= s / 2 per group (+ fp16 scale rounding)
        assert (err <= s.float().repeat_interleave(CHUNK, 1)[:, :256] * 0.501 + 1e-7).all()
        assert (dense[w == 0] == 0).all()  # pruned zeros stay exactly 0 (the zero point is an integer)


def test_int4_zero_activations_and_all_zero_weight():
    w = torch.zeros(10, 70)
    for kind in INT4_KINDS:
        mod = PackedLinearModule(pack_linear(w, kind, torch.arange(10.0)))
        for x in (torch.zeros(1, 70), torch.randn(3, 70)):
            assert torch.equal(mod(x), torch.arange(10.0).expand(x.shape[0], 10))


def test_int4_round_trip_and_bytes(tmp_path):
    n, k = 300, 200
    w = sparse_weight(n, k, 0.7, seed=1)
    layers = {"a": pack_linear(w, "sparse-int4", torch.randn(n)), "b": pack_linear(w, "dense-int4")}
    back = load_packed(save_packed(layers, tmp_path / "w.safetensors"))
    for name, p in layers.items():
        q = back[name]
        assert q.kind == p.kind and set(q.tensors) == set(p.tensors)
        for f in p.tensors:
            assert torch.equal(q.tensors[f], p.tensors[f])
    sp, de = back["a"], back["b"]
    kc, tiles = 4, 75
    nnz = int((w != 0).sum())
    assert sp.nnz == nnz
    # codes: half a byte per non-zero (each (row, chunk) rounded up to whole bytes) + 32 padding; masks
    # 8 B per (row, chunk); tile_ptr; an fp16 scale and a uint8 zero point per (row, chunk); comp 4 B per row
    code_bytes = int(sp.tensors["tile_ptr"][-1])
    assert nnz / 2 <= code_bytes <= nnz / 2 + n * kc / 2 + 1
    assert sp.stored_bytes() == code_bytes + 32 + tiles * kc * 4 * 8 + (tiles + 1) * 8 + tiles * kc * 4 * 3 + n * 4
    assert de.stored_bytes() == n * kc * 32 + n * kc * 3 + n * 4
    assert sp.bytes_read() == sp.stored_bytes() - 32


def test_int4_bad_arguments_are_one_line_errors():
    o = ops.ops()
    p = pack_linear(sparse_weight(8, 64, 0.5, 0), "sparse-int4")
    t = p.tensors
    with pytest.raises(RuntimeError, match="error: scales"):
        o.sparse_linear_i4(torch.randn(1, 64), t["masks"], t["tile_ptr"], t["values"], t["scales"].float(), t["zeros"],
                           t["comp"], None, 8)
    with pytest.raises(RuntimeError, match="error: int4 kernels take in_features"):
        d = pack_linear(torch.randn(1, 70000), "dense-int4")
        o.dense_linear_i4(torch.randn(1, 70000), d.tensors["q"], d.tensors["scales"], d.tensors["zeros"], d.tensors["comp"],
                          None, 1)
