"""How many weight bytes one decode step reads, from the ONNX file a backend runs.

Decode of a causal LM at batch 1 streams every weight matrix once per generated token (the KV
cache, read too, is counted apart). From the graph's initializers:
- *matrices* (2-D, ≥ 1024 elements, used by anything but a Gather): read whole by a dense kernel
  (`dense_bytes`, zeros included); a sparse kernel reads at least the non-zero values plus where
  they are — `sparse_bytes` = non-zeros × element size + a 1-bit-per-element mask (the compact
  bitmask form; an index-list format costs more above ~1/8 density);
- *embedding tables* (the data input of a Gather): one row per token;
- everything else (norms, biases, quantization scales, rotary tables): read whole, tiny.
External data are read through a memory map, in place, so a 4 GB model costs no extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_MATRIX_ELEMENTS = 1024


@dataclass(frozen=True)
class WeightTraffic:
    dense_bytes: int  # matrices as stored (zeros included)
    float_dense_bytes: int  # the float32 part of dense_bytes (a bf16 runtime reads half of it)
    nonzero_bytes: int  # matrices: non-zero values only
    mask_bytes: int  # matrices: 1 bit per element
    elements: int
    nonzeros: int
    embedding_row_bytes: int  # per token
    embedding_bytes: int  # whole tables (memory, not traffic)
    other_bytes: int
    matrices: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.elements if self.elements else 0.0

    @property
    def sparse_bytes(self) -> int:
        return self.nonzero_bytes + self.mask_bytes

    def per_token(self, sparse_kernels: bool, float_itemsize: int = 4) -> int:
        """Weight bytes streamed per generated token, dense or sparse (whichever the kernel reads);
        `float_itemsize` 2 when the runtime keeps float32 matrices in bf16 (OpenVINO on AMX)."""
        dense = self.dense_bytes - self.float_dense_bytes * (4 - float_itemsize) // 4
        matrices = min(self.sparse_bytes, dense) if sparse_kernels else dense
        return matrices + self.embedding_row_bytes + self.other_bytes

    def resident(self, sparse_kernels: bool, float_itemsize: int = 4) -> int:
        """Bytes the weights take in memory in that representation (whole embedding tables)."""
        return self.per_token(sparse_kernels, float_itemsize) - self.embedding_row_bytes + self.embedding_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"dense_bytes": self.dense_bytes, "sparse_bytes": self.sparse_bytes, "nonzero_bytes": self.nonzero_bytes,
                "sparsity": round(self.sparsity, 4), "embedding_row_bytes": self.embedding_row_bytes,
                "embedding_bytes": self.embedding_bytes, "other_bytes": self.other_bytes, "matrices": self.matrices}


def initializer_arrays(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """The graph (without weights) and its initializers by name; external data memory-mapped, not loaded."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    arrays = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            count = int(np.prod(init.dims)) if len(init.dims) else 1
            arrays[init.name] = np.memmap(Path(path).parent / info["location"], dtype=dtype, mode="r",
                                          offset=int(info.get("offset", 0)), shape=(count,)).reshape(tuple(init.dims))
        else:
            arrays[init.name] = numpy_helper.to_array(init)
    return model, arrays


def weight_traffic(path: Path) -> WeightTraffic:
    model, arrays = initializer_arrays(path)
    gathered, other_use = set(), set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in arrays:
                (gathered if node.op_type == "Gather" and i == 0 else other_use).add(name)
    counts = dict(dense=0, float_dense=0, nonzero=0, mask=0, elements=0, nonzeros=0, row=0, emb=0, other=0, matrices=0)
    for name, arr in arrays.items():
        size = arr.size * arr.itemsize
        if name in gathered and name not in other_use:
            counts["emb"] += size
            counts["row"] += size // max(arr.shape[0], 1) if arr.ndim else size
        elif arr.ndim == 2 and arr.size >= MIN_MATRIX_ELEMENTS:
            nnz = _count_nonzero(arr)
            counts["dense"] += size
            counts["float_dense"] += size if arr.dtype == np.float32 else 0
            counts["nonzero"] += nnz * arr.itemsize
            counts["mask"] += (arr.size + 7) // 8
            counts["elements"] += arr.size
            counts["nonzeros"] += nnz
            counts["matrices"] += 1
        else:
            counts["other"] += size
    return WeightTraffic(counts["dense"], counts["float_dense"], counts["nonzero"], counts["mask"], counts["elements"], counts["nonzeros"],
                         counts["row"], counts["emb"], counts["other"], counts["matrices"])


def _count_nonzero(arr: np.ndarray, chunk_rows: int = 4096) -> int:
    """Non-zeros of a (possibly memory-mapped) matrix, a slab of rows at a time."""
    return sum(int(np.count_nonzero(arr[i:i + chunk_rows])) for i in range(0, arr.shape[0], chunk_rows))


def kv_bytes_per_token(lowering: dict[str, Any], past_len: float) -> int:
    """Bytes of KV cache one decode step reads with `past_len` cached tokens (keys + values, fp32)."""
    kv = lowering["kv"]
    itemsize = np.dtype(kv.get("dtype", "float32")).itemsize
    return int(2 * kv["layers"] * kv["kv_heads"] * kv["head_dim"] * itemsize * past_len)
