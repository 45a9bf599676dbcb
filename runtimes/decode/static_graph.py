"""Fixed-shape copies of a causal-LM KV-cache graph, for engines that compile for static shapes.

`static_kv_graph(src, dst, input_len, past_len)` writes `dst`: the same graph with every input
dimension fixed — batch 1, `input_ids`/`position_ids` (1, input_len), `attention_mask`
(1, past_len + input_len), `past_key_values.*` (1, kv_heads, past_len, head_dim) — and the output
shapes re-inferred. The weights are not copied: when the source keeps them in external data, the
copy references the same file (a symlink beside `dst`), so a 4 GB model costs no extra disk.
DeepSparse needs two such graphs (prefill: the prompt after a 1-slot dummy past; decode: one token
after `slots` past slots, see `runtimes.decode.loop`); a past length of 0 would leave the dimension
dynamic and disable its optimized runtime.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from compiler.errors import SparsecError

EXTERNAL_DATA_FILE = "model.onnx.data"


def fix_kv_shapes(model: Any, input_len: int, past_len: int) -> dict[str, list[int]]:
    """Fix every graph input's dims in place (see the module docstring); returns name → shape."""
    import onnx

    if input_len <= 0 or past_len <= 0:
        raise SparsecError(f"static KV graphs need input and past lengths > 0, got {input_len} and {past_len}")
    initializers = {i.name for i in model.graph.initializer}
    shapes: dict[str, list[int]] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name.startswith("past_key_values."):
            if len(dims) != 4 or not dims[1].dim_value or not dims[3].dim_value:
                raise SparsecError(f"'{inp.name}' is not a (batch, heads, past, head_dim) tensor with static heads")
            shape = [1, dims[1].dim_value, past_len, dims[3].dim_value]
        elif inp.name == "attention_mask":
            shape = [1, past_len + input_len]
        elif inp.name in ("input_ids", "position_ids"):
            shape = [1, input_len]
        else:
            raise SparsecError(f"unexpected input '{inp.name}' in a causal-LM KV-cache graph")
        for dim, value in zip(dims, shape):
            dim.Clear()
            dim.dim_value = value
        shapes[inp.name] = shape
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return shapes


def static_kv_graph(src: Path, dst: Path, input_len: int, past_len: int,
                    rewrite: Any = None) -> Path:
    """Write the fixed-shape copy of `src` to `dst` (weights shared with `src`, see above).
    `rewrite(model)` may adapt the graph further for a runtime (e.g. DeepSparse's domain checks)."""
    import onnx

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = (src.parent / EXTERNAL_DATA_FILE).exists()
    model = onnx.load(str(src), load_external_data=not external)
    if rewrite is not None:
        model = rewrite(model)
    fix_kv_shapes(model, input_len, past_len)
    if external:
        _share_external_data(src.parent / EXTERNAL_DATA_FILE, dst.parent / EXTERNAL_DATA_FILE)
    onnx.save_model(model, str(dst))
    return dst


def _share_external_data(source: Path, link: Path) -> None:
    if link.exists() or link.is_symlink():
        if link.resolve() == source.resolve():
            return
        link.unlink()
    try:
        os.symlink(source.resolve(), link)
    except OSError:  # a filesystem without symlinks: copy once
        shutil.copyfile(source, link)
