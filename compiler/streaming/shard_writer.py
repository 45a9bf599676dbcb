"""Write a streamed model as a Hugging Face directory: config, tokenizer, one safetensors shard per
block plus one for the outer part, and `model.safetensors.index.json` — one block in memory at a time.

A block whose weights changed already sits in the overlay as a finished shard: it is moved (renamed:
the overlay lives beside the artifact, on the same filesystem) instead of written again, and the
residency then reads it from its new place. An unchanged block is converted from the checkpoint.
Keys and dtype are those `save_pretrained` of the in-memory model writes (module paths, tied
weights once, compute dtype), so both modes load identically.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from compiler.streaming.block_loader import save_tensors
from compiler.streaming.index import INDEX_FILE
from compiler.streaming.streamed_ir import StreamedIR


def write_streamed_model(ir: StreamedIR, directory: Path) -> dict[str, Any]:
    """Write the model; returns {"shards", "bytes", "seconds", "moved"} for the report."""
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    ir.config.save_pretrained(directory)
    gen = getattr(ir.module, "generation_config", None)
    if gen is not None and getattr(ir.module, "can_generate", lambda: False)():
        gen.save_pretrained(directory)
    if ir.tokenizer is not None:
        ir.tokenizer.save_pretrained(directory)
    res = ir.residency
    res.evict_all()  # changed blocks go to the overlay first
    total = len(res.block_names) + 1
    weight_map: dict[str, str] = {}
    written, moved = 0, 0
    for k in range(len(res.block_names)):
        name = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        target = directory / name
        if k in res.overlay:
            shutil.move(str(res.overlay[k]), str(target))
            res.overlay[k] = target
            moved += 1
            keys = list(res.block_params[k])
        else:
            tensors = res.block_tensors(k)
            save_tensors(tensors, target)
            keys = list(tensors)
        written += target.stat().st_size
        weight_map.update({key: name for key in keys})
    outer = {n: res.params[n].data for n in res.outer_params}
    state = ir.module.state_dict(keep_vars=True)
    aliases = {a for names in res.aliases.values() for a in names}
    outer.update({k: v.detach() for k, v in state.items() if k not in aliases})  # persistent buffers
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_tensors(outer, directory / name)
    written += (directory / name).stat().st_size
    weight_map.update({key: name for key in outer})
    size = sum(res.params[n].numel() * res.params[n].element_size() for n in res.params)
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))},
                                                   indent=2) + "\n", encoding="utf-8")
    return {"shards": total, "bytes": written, "seconds": round(time.perf_counter() - start, 3), "moved": moved}
