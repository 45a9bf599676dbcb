"""The packed weight format of one Linear (out x in), and its sparse-on-disk safetensors file.

The input columns are cut into chunks of 64; each (row, chunk) has a 64-bit presence mask and the
non-zeros are stored contiguously. Rows are grouped in tiles of 4 whose data is interleaved chunk by
chunk (masks[(tile, chunk, row)], values in (tile, chunk, row, column) order), so a tile is one
sequential stream for the hardware prefetcher; `tile_ptr` holds where each tile's values start, so
tiles are independent (threads split tiles). The values are int8 with one fp32 scale per output
channel plus the row sums of the int8 weights (the +128 compensation of the u8 x s8 VNNI product),
or 4-bit codes (two per byte) with one fp16 scale and one integer zero point per (row, 64-column chunk)
(asymmetric, MatMulNBits' scheme), or plain fp32, or bf16 (the weight rounded to bfloat16, activations and
sums fp32: half fp32's bytes, no activation quantization). Dense int8 / int4 / bf16 kinds (row-major, zero-padded to 64 columns) are
the same-family dense baselines and the LM head's fast path. Bytes per weight at sparsity s: int8
(1 - s) + 1/8, int4 (1 - s)/2 + 1/8 + 3/64, fp32 4 (1 - s) + 1/8, bf16 2 (1 - s) + 1/8, plus 8 bytes of scale + rowsum
(int8) or 4 of comp (int4) per row and 8 of tile_ptr per 4 rows.

On disk (`save_packed` / `load_packed`): one safetensors file of exactly these arrays (keys
`<layer>.<field>`) whose metadata lists each layer's kind and shape. Loading reads the packed arrays
and never builds a dense matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

Kind = Literal["sparse-int8", "sparse-fp32", "dense-int8", "sparse-int4", "dense-int4", "sparse-bf16", "dense-bf16"]
KINDS: tuple[str, ...] = ("sparse-int8", "sparse-fp32", "dense-int8", "sparse-int4", "dense-int4", "sparse-bf16",
                          "dense-bf16")
DENSE_KINDS = ("dense-int8", "dense-int4", "dense-bf16")
FORMAT = "sparsec-packed-v1"
CHUNK = 64
TILE = 4  # rows per interleaved tile (csrc/common.h kTile)
# values read 64 bytes (int8) / 16 floats (fp32) / 32 bytes of codes (int4) / 32 bf16 past each chunk start
PAD = {"sparse-int8": 64, "sparse-fp32": 16, "sparse-int4": 32, "sparse-bf16": 32}
FIELDS = {"sparse-int8": ("masks", "tile_ptr", "values", "scales", "rowsum"),
          "sparse-fp32": ("masks", "tile_ptr", "values"),
          "dense-int8": ("q", "scales", "rowsum"),
          "sparse-int4": ("masks", "tile_ptr", "values", "scales", "zeros", "comp"),
          "dense-int4": ("q", "scales", "zeros", "comp"),
          "sparse-bf16": ("masks", "tile_ptr", "values"),
          "dense-bf16": ("q",)}
I4_MAX = 15  # int4 codes u in [0, 15]; W = s * (u - z) (csrc/common.h)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


@dataclass
class PackedLinear:
    """One Linear weight in the packed format (plus its bias). `tensors` holds the FIELDS of `kind`."""

    kind: str
    out_features: int
    in_features: int
    tensors: dict[str, torch.Tensor]
    bias: torch.Tensor | None = None
    meta: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        return (self.in_features + CHUNK - 1) // CHUNK

    @property
    def tiles(self) -> int:
        return (self.out_features + TILE - 1) // TILE

    @property
    def nnz(self) -> int:
        if self.kind in DENSE_KINDS:
            return self.out_features * self.in_features
        if self.kind == "sparse-int4":  # tile_ptr counts bytes of codes here
            return mask_bits(self.tensors["masks"])
        return int(self.tensors["tile_ptr"][-1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    def stored_bytes(self) -> int:
        """Bytes of every packed array (what sits in memory and on disk), bias excluded."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bytes_read(self) -> int:
        """Bytes one batch-1 call reads from the weight: masks, non-zeros, tile_ptr, scales, rowsums."""
        total = self.stored_bytes()
        if self.kind in PAD:
            total -= PAD[self.kind] * self.tensors["values"].element_size()
        return total

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown packed kind '{self.kind}' (known: {', '.join(KINDS)})")
        missing = [f for f in FIELDS[self.kind] if f not in self.tensors]
        if missing:
            raise ValueError(f"packed {self.kind} layer lacks {missing}")
        n, kc = self.out_features, self.chunks
        shapes = {"masks": self.tiles * kc * TILE, "tile_ptr": self.tiles + 1, "scales": n, "rowsum": n, "comp": n,
                  "q": n * kc * CHUNK}
        if self.kind == "sparse-int4":
            shapes.update(scales=self.tiles * kc * TILE, zeros=self.tiles * kc * TILE)
        elif self.kind == "dense-int4":
            shapes.update(scales=n * kc, zeros=n * kc, q=n * kc * CHUNK // 2)
        for name, size in shapes.items():
            if name in self.tensors and self.tensors[name].numel() != size:
                raise ValueError(f"packed {self.kind} layer: {name} has {self.tensors[name].numel()} elements, expected {size}")


def mask_bits(masks: torch.Tensor) -> int:
    """Set bits of int64 presence masks: the non-zeros they describe."""
    return int(_POPCOUNT[masks.contiguous().view(torch.uint8).to(torch.int64)].sum())


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: W ~= scales[:, None] * q, q in [-127, 127]."""
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.contiguous()


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest int4 in groups of 64 along the input dim (onnxruntime MatMulNBits' /
    NNCF INT4_ASYM's scheme) of [n, k] padded to 64 columns: codes u uint8 [n, kp], fp16 scales s and
    uint8 zero points z [n, kc], W ~= s * (u - z). The range [min(W, 0), max(W, 0)] takes 15 steps, so a
    zero weight (pruned, or a padding column) is exactly level 0; the codes are computed with the
    fp16-rounded scale, so the kernels' dequantization is exactly s16 * (u - z)."""
    w = _pad_columns(weight.detach().to(torch.float32))
    n, kp = w.shape
    g = w.view(n, kp // CHUNK, CHUNK)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    scales = ((hi - lo) / I4_MAX).to(torch.float16)
    s32 = scales.to(torch.float32)
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    zeros = torch.round(-lo / safe).clamp_(0, I4_MAX)
    u = (torch.round(g / safe[:, :, None]) + zeros[:, :, None]).clamp_(0, I4_MAX).to(torch.uint8)
    return u.view(n, kp), scales, zeros.to(torch.uint8)


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Pairs of codes -> bytes, code 2j in the low nibble of byte j (u has an even length)."""
    return (u[0::2] | (u[1::2] << 4)).to(torch.uint8)


def _pack_int4(weight: torch.Tensor, kind: str, b: torch.Tensor | None) -> PackedLinear:
    n, k = weight.shape
    u, scales, zeros = quantize_int4(weight)
    kc = u.shape[1] // CHUNK
    levels = (u.to(torch.int32).view(n, kc, CHUNK) - zeros.to(torch.int32)[:, :, None])
    if kind == "dense-int4":
        comp = 128.0 * (scales.to(torch.float64) * levels.sum(dim=2).to(torch.float64)).sum(dim=1)
        tensors = {"q": _pack_nibbles(u.reshape(-1)), "scales": scales.reshape(-1).contiguous(),
                   "zeros": zeros.reshape(-1).contiguous(), "comp": comp.to(torch.float32)}
        return PackedLinear(kind, n, k, tensors, b)
    nonzero_rows = _pad_columns(weight.detach() != 0).view(n, kc, CHUNK)
    comp = 128.0 * (scales.to(torch.float64) * (levels * nonzero_rows).sum(dim=2).to(torch.float64)).sum(dim=1)
    tiled_u = _tiled(u)                                   # [tiles, kc, TILE, 64]
    nonzero = _tiled(_pad_columns(weight.detach() != 0))  # padded rows / columns: empty
    tiles = tiled_u.shape[0]
    counts = nonzero.sum(dim=3).reshape(-1)               # per (tile, chunk, row)
    group_bytes = (counts + 1) // 2
    offsets = torch.zeros_like(group_bytes)
    offsets[1:] = torch.cumsum(group_bytes, 0)[:-1]
    flat_nz = nonzero.reshape(-1, CHUNK)
    rank = torch.cumsum(flat_nz.to(torch.int64), dim=1) - 1
    nibble = (2 * offsets[:, None] + rank)[flat_nz]
    total = int(group_bytes.sum())
    nibbles = torch.zeros(2 * total, dtype=torch.uint8)
    nibbles[nibble] = tiled_u.reshape(-1, CHUNK)[flat_nz]
    values = torch.cat([_pack_nibbles(nibbles), torch.zeros(PAD[kind], dtype=torch.uint8)])
    tile_ptr = torch.zeros(tiles + 1, dtype=torch.int64)
    tile_ptr[1:] = torch.cumsum(group_bytes.view(tiles, -1).sum(dim=1), 0)
    tensors = {"masks": _masks(nonzero), "tile_ptr": tile_ptr, "values": values,
               "scales": _tile_order(scales, tiles), "zeros": _tile_order(zeros, tiles), "comp": comp.to(torch.float32)}
    return PackedLinear(kind, n, k, tensors, b)


def _tile_order(per_group: torch.Tensor, tiles: int) -> torch.Tensor:
    """[n, kc] -> [tiles * kc * TILE] in (tile, chunk, row) order, padded rows 0."""
    n, kc = per_group.shape
    out = torch.zeros(tiles * TILE, kc, dtype=per_group.dtype)
    out[:n] = per_group
    return out.view(tiles, TILE, kc).permute(0, 2, 1).reshape(-1).contiguous()


def _tiled(w: torch.Tensor) -> torch.Tensor:
    """[n, kp] -> [tiles, kc, TILE, 64] (rows padded to whole tiles with zeros): the storage order."""
    n, kp = w.shape
    tiles = (n + TILE - 1) // TILE
    if tiles * TILE != n:
        w = torch.cat([w, torch.zeros(tiles * TILE - n, kp, dtype=w.dtype)])
    return w.view(tiles, TILE, kp // CHUNK, CHUNK).permute(0, 2, 1, 3).contiguous()


def _masks(nonzero: torch.Tensor) -> torch.Tensor:
    """[tiles, kc, TILE, 64] bool -> [tiles*kc*TILE] int64 bit masks (bit j <=> column 64c + j)."""
    flat = nonzero.reshape(-1, CHUNK)
    shifts = torch.arange(CHUNK, dtype=torch.int64)
    out = torch.empty(flat.shape[0], dtype=torch.int64)
    step = 1 << 16  # bound the int64 temporary to 32 MiB
    for r in range(0, flat.shape[0], step):
        out[r:r + step] = (flat[r:r + step].to(torch.int64) << shifts).sum(dim=-1)  # distinct bits: sum == OR
    return out


def _pad_columns(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    kp = (k + CHUNK - 1) // CHUNK * CHUNK
    if kp == k:
        return w.contiguous()
    out = torch.zeros(n, kp, dtype=w.dtype)
    out[:, :k] = w
    return out


def pack_linear(weight: torch.Tensor, kind: str, bias: torch.Tensor | None = None) -> PackedLinear:
    """Pack a dense [out, in] weight (zeros = pruned) into `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown packed kind '{kind}' (known: {', '.join(KINDS)})")
    if weight.dim() != 2:
        raise ValueError(f"pack_linear needs a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if kind in ("sparse-int4", "dense-int4"):
        return _pack_int4(weight, kind, b)
    if kind == "dense-int8":
        q, scales = quantize_int8(weight)
        qp = _pad_columns(q)
        tensors = {"q": qp.reshape(-1), "scales": scales, "rowsum": q.to(torch.int32).sum(1).to(torch.int32)}
        return PackedLinear(kind, n, k, tensors, b)
    if kind == "dense-bf16":
        return PackedLinear(kind, n, k, {"q": _pad_columns(weight.detach().to(torch.bfloat16)).reshape(-1)}, b)
    if kind == "sparse-int8":
        q, scales = quantize_int8(weight)
        # masks from the quantized weight: a value that rounds to 0 is not stored
        vals, extra = _pad_columns(q), {"scales": scales, "rowsum": q.to(torch.int32).sum(1).to(torch.int32)}
    elif kind == "sparse-bf16":  # masks from the rounded weight, like int8
        vals, extra = _pad_columns(weight.detach().to(torch.bfloat16)), {}
    else:
        vals, extra = _pad_columns(weight.detach().to(torch.float32)), {}
    tiled = _tiled(vals)
    nonzero = tiled != 0
    counts = nonzero.view(nonzero.shape[0], -1).sum(dim=1)
    tile_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    tile_ptr[1:] = torch.cumsum(counts, 0)
    values = torch.cat([tiled[nonzero], torch.zeros(PAD[kind], dtype=vals.dtype)])
    tensors = {"masks": _masks(nonzero), "tile_ptr": tile_ptr, "values": values, **extra}
    return PackedLinear(kind, n, k, tensors, b)


def unpack_dense(p: PackedLinear) -> torch.Tensor:
    """The dense fp32 [out, in] weight a packed layer represents (tests and references only)."""
    n, k, kc = p.out_features, p.in_features, p.chunks
    if p.kind == "dense-int8":
        q = p.tensors["q"].view(n, kc * CHUNK)[:, :k].to(torch.float32)
        return q * p.tensors["scales"][:, None]
    if p.kind == "dense-bf16":
        return p.tensors["q"].view(n, kc * CHUNK)[:, :k].to(torch.float32).contiguous()
    if p.kind in ("dense-int4", "sparse-int4"):
        levels, scales = int4_dense_levels(p)
        return (levels[:, :k].to(torch.float32) * scales.repeat_interleave(CHUNK, dim=1)[:, :k]).contiguous()
    tiles = p.tiles
    bits = (p.tensors["masks"].view(tiles, kc, TILE, 1) >> torch.arange(CHUNK, dtype=torch.int64)) & 1
    nonzero = bits.bool()
    tiled = torch.zeros(tiles, kc, TILE, CHUNK, dtype=torch.float32)
    tiled[nonzero] = p.tensors["values"][:p.nnz].to(torch.float32)
    dense = tiled.permute(0, 2, 1, 3).reshape(tiles * TILE, kc * CHUNK)[:n, :k]
    if p.kind == "sparse-int8":
        dense = dense * p.tensors["scales"][:, None]
    return dense.contiguous()


def int4_dense_levels(p: PackedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels u - z as int32 [n, kp], 0 where the mask is empty; fp32 scales [n, kc]) of an int4 layer:
    the integers the kernels multiply (tests compare their accumulations exactly)."""
    n, kc = p.out_features, p.chunks
    b = p.tensors["values"] if p.kind == "sparse-int4" else p.tensors["q"]
    u = torch.stack([b & 0x0F, b >> 4], dim=1).reshape(-1).to(torch.int32)
    if p.kind == "dense-int4":
        z = p.tensors["zeros"].to(torch.int32).view(n, kc)
        levels = u.view(n, kc, CHUNK) - z[:, :, None]
        return levels.reshape(n, kc * CHUNK), p.tensors["scales"].to(torch.float32).view(n, kc)
    tiles = p.tiles
    nonzero = ((p.tensors["masks"].view(tiles, kc, TILE, 1) >> torch.arange(CHUNK, dtype=torch.int64)) & 1).bool()
    counts = nonzero.sum(dim=3).reshape(-1)
    offsets = torch.zeros_like(counts)
    offsets[1:] = torch.cumsum((counts + 1) // 2, 0)[:-1]
    flat = nonzero.reshape(-1, CHUNK)
    rank = torch.cumsum(flat.to(torch.int64), dim=1) - 1
    z = p.tensors["zeros"].to(torch.int32)[:, None].expand(-1, CHUNK)
    levels = torch.zeros(flat.shape, dtype=torch.int32)
    levels[flat] = u[(2 * offsets[:, None] + rank)[flat]] - z[flat]
    dense = levels.view(tiles, kc, TILE, CHUNK).permute(0, 2, 1, 3).reshape(tiles * TILE, kc * CHUNK)[:n]
    scales = p.tensors["scales"].to(torch.float32).view(tiles, kc, TILE).permute(0, 2, 1).reshape(tiles * TILE, kc)[:n]
    return dense.contiguous(), scales.contiguous()


def save_packed(layers: dict[str, PackedLinear], path: str | Path, extra_meta: dict | None = None) -> Path:
    """Write the packed layers (and biases) as one safetensors file; returns its path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, torch.Tensor] = {}
    index = {}
    for name, p in layers.items():
        p.validate()
        for f, t in p.tensors.items():
            arrays[f"{name}.{f}"] = t.contiguous()
        if p.bias is not None:
            arrays[f"{name}.bias"] = p.bias.contiguous()
        index[name] = {"kind": p.kind, "out": p.out_features, "in": p.in_features, **p.meta}
    meta = {"format": FORMAT, "layers": json.dumps(index), **{k: json.dumps(v) for k, v in (extra_meta or {}).items()}}
    save_file(arrays, str(path), metadata=meta)
    return path


def load_packed(path: str | Path) -> dict[str, PackedLinear]:
    """Read a file written by save_packed: packed arrays only, no dense matrix is ever built."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"error: packed weights '{path}' not found")
    layers: dict[str, PackedLinear] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"error: '{path}' is not a {FORMAT} file (format={meta.get('format')!r})")
        index = json.loads(meta["layers"])
        keys = set(f.keys())
        for name, info in index.items():
            kind = info["kind"]
            # copied out of safetensors' file mapping: a tensor left on the mapping keeps the whole file mapped,
            # and the pages of arrays that fusion copies and drops stayed resident in it (1.1B dense int8:
            # 600 MiB of the file in RSS, ~210 MiB of them dead; docs/kernels.md, memory)
            tensors = {fld: f.get_tensor(f"{name}.{fld}").clone() for fld in FIELDS[kind]}
            bias = f.get_tensor(f"{name}.bias").clone() if f"{name}.bias" in keys else None
            extra = {k: v for k, v in info.items() if k not in ("kind", "out", "in")}
            p = PackedLinear(kind, int(info["out"]), int(info["in"]), tensors, bias, extra)
            p.validate()
            layers[name] = p
    return layers
