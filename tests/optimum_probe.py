"""Runs INSIDE the optimum venv (`sparsec backends install optimum`: optimum-onnx 0.1.0, transformers 4.57),
never in sparsec's own: loads lowered artifacts as a user of optimum would and writes what it got.

    python optimum_probe.py JOB.json OUT.npz      (tests/test_optimum_interop.py drives it)

JOB: {"encoder": DIR, "texts": [...], "lm": DIR, "lm_subfolders": ["", "int8-dynamic"], "prompt": str,
"new_tokens": int}. Writes arrays to OUT.npz and a JSON summary (versions, classes, config values) on
stdout. It imports nothing from sparsec: only what the venv holds.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np


def encoder(directory: str, texts: list[str], arrays: dict) -> dict:
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = ORTModelForFeatureExtraction.from_pretrained(directory)
    batch = tokenizer(texts, padding=True, return_tensors="np")
    hidden = model(**batch).last_hidden_state
    arrays.update(enc_ids=batch["input_ids"], enc_mask=batch["attention_mask"], enc_hidden=np.asarray(hidden))
    pooling = Path(directory) / "1_Pooling" / "config.json"
    return {"tokenizer_class": type(tokenizer).__name__, "model_class": type(model).__name__,
            "pooling": json.loads(pooling.read_text()) if pooling.is_file() else None}


def causal_lm(directory: str, subfolder: str, prompt: str, new_tokens: int, arrays: dict, key: str) -> dict:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, subfolder=subfolder)
    config = AutoConfig.from_pretrained(directory, subfolder=subfolder)
    model = ORTModelForCausalLM.from_pretrained(directory, subfolder=subfolder)
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    arrays[f"{key}_prompt"] = enc["input_ids"].numpy()
    arrays[f"{key}_tokens"] = out[0, enc["input_ids"].shape[1]:].numpy()
    return {"tokenizer_class": type(tokenizer).__name__, "model_class": type(model).__name__,
            "session_file": Path(model.path).relative_to(directory).as_posix(),
            "rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None),
            "use_cache": config.use_cache, "can_use_cache": model.can_use_cache,
            "eos_token_id": model.generation_config.eos_token_id}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import transformers

    arrays: dict = {}
    summary: dict = {"versions": {"transformers": transformers.__version__, "optimum-onnx": version("optimum-onnx")}}
    if job.get("encoder"):
        summary["encoder"] = encoder(job["encoder"], job["texts"], arrays)
    for i, sub in enumerate(job.get("lm_subfolders", []) if job.get("lm") else []):
        summary[f"lm{i}"] = causal_lm(job["lm"], sub, job["prompt"], job["new_tokens"], arrays, f"lm{i}")
    np.savez(sys.argv[2], **arrays)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
