"""The Hugging Face files beside a lowered graph, so that an `onnx/` directory loads as it is.

optimum's `ORTModel*.from_pretrained(ART/onnx)` reads `config.json` (without it: "The library name
could not be automatically inferred"), `AutoTokenizer` reads the tokenizer files, `generate` reads
`generation_config.json`. optimum-onnx pins transformers<4.58 while sparsec runs on transformers 5, so
what is written here must read the same under both:

- `config.json`: transformers 5 writes RoPE settings as `rope_parameters` only; 4.x reads `rope_theta`
  and `rope_scaling`. Both forms are written (5.x reads `rope_scaling` as an alias, checked on 5.24);
- `tokenizer_config.json`: transformers 5 names its generic tokenizer class `TokenizersBackend`, which
  4.x does not have ("Tokenizer class TokenizersBackend does not exist"); it becomes
  `PreTrainedTokenizerFast` (both load it from tokenizer.json). Model-specific names (`BertTokenizer`)
  stay: 4.x picks their `...Fast` class from tokenizer.json. Loader arguments 5.x writes into the
  file (`is_local`, `local_files_only`) are dropped. `model_input_names` is written: the tokenizer's
  own names that the graph takes (4.x's generic default adds `token_type_ids`, which a causal LM's
  `generate` rejects);
- sentence encoders keep the source's sentence-transformers files (modules.json, the pooling config)
  — they say how token states become one embedding;
- causal LMs get `use_cache: true` and a `generation_config.json` (from the model's, or derived from
  its config).

The int8/int4 variant directories (`onnx/int8-dynamic/`, ...) get the same files, so each loads with
`from_pretrained(ART/onnx, subfolder=VARIANT)`. tests/test_optimum_interop.py loads artifacts with
optimum-onnx under transformers 4.57 in its own venv.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compiler.ir import ModelIR

GENERIC_TOKENIZER_4X = "PreTrainedTokenizerFast"
GENERIC_TOKENIZER_5X = ("TokenizersBackend",)
LOADER_ONLY_KEYS = ("is_local", "local_files_only")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
GRAPH_FILES = ("model.onnx", "model.onnx.data")


def portable_config(data: dict[str, Any], causal: bool) -> dict[str, Any]:
    """A config dict readable by transformers 4.x and 5.x (see the module docstring)."""
    out = dict(data)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # one RoPE for every layer (not per layer type)
        out.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        plain = set(scaling) <= {"rope_type"} and scaling.get("rope_type", "default") == "default"
        out.setdefault("rope_scaling", None if plain else scaling)
    if causal:
        out["use_cache"] = True
    return out


def portable_tokenizer_config(data: dict[str, Any], input_names: list[str]) -> dict[str, Any]:
    """tokenizer_config.json with a class name transformers 4.x knows and the model inputs the graph
    takes (`input_names`, in the tokenizer's order; see the module docstring)."""
    out = {k: v for k, v in data.items() if k not in LOADER_ONLY_KEYS}
    if out.get("tokenizer_class") in (None, *GENERIC_TOKENIZER_5X):
        out["tokenizer_class"] = GENERIC_TOKENIZER_4X
    if input_names:
        out["model_input_names"] = input_names
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_hf_files(ir: ModelIR, directory: Path, task: str, graph_inputs: tuple[str, ...] | list[str]) -> list[str]:
    """Write config, tokenizer, generation config and sentence-transformers files into `directory`
    (beside model.onnx, whose inputs are `graph_inputs`); returns the names written (files and folders,
    sorted). Plain modules get none."""
    if task == "module" or ir.config is None or not hasattr(ir.config, "to_json_string"):
        return []
    causal = task == "text-generation"
    directory.mkdir(parents=True, exist_ok=True)
    written = ["config.json"]
    _write_json(directory / "config.json", portable_config(json.loads(ir.config.to_json_string(use_diff=False)), causal))
    if causal:
        _save_generation_config(ir, directory)
        written.append("generation_config.json")
    if ir.tokenizer is not None and hasattr(ir.tokenizer, "save_pretrained"):
        saved = ir.tokenizer.save_pretrained(str(directory))
        written += [Path(f).name for f in saved or () if Path(f).is_file()]
        tok_cfg = directory / "tokenizer_config.json"
        if tok_cfg.is_file():
            names = [n for n in getattr(ir.tokenizer, "model_input_names", ()) if n in graph_inputs]
            _write_json(tok_cfg, portable_tokenizer_config(json.loads(tok_cfg.read_text(encoding="utf-8")), names))
    if not causal and ir.source_dir is not None:
        written += _copy_sentence_transformers(Path(ir.source_dir), directory)
    return sorted(set(written))


def _save_generation_config(ir: ModelIR, directory: Path) -> None:
    from transformers import GenerationConfig

    gen = getattr(ir.module, "generation_config", None)
    if gen is None or not hasattr(gen, "save_pretrained"):
        gen = GenerationConfig.from_model_config(ir.config)
    gen.save_pretrained(str(directory))


def _copy_sentence_transformers(source: Path, directory: Path) -> list[str]:
    """The source's sentence-transformers files and module folders (`1_Pooling/`, ...), when it has
    them; returns the names copied."""
    modules = source / "modules.json"
    if not modules.is_file():
        return []
    names = list(SENTENCE_TRANSFORMERS_FILES)
    try:
        listed = [m.get("path") for m in json.loads(modules.read_text(encoding="utf-8"))]
        names += [n for n in listed if isinstance(n, str) and n and Path(n).name == n and n != ".."]  # no escape
    except (ValueError, TypeError, AttributeError):
        pass  # an unreadable modules.json is still copied as it is; its folders are not guessed
    copy_hf_files(names, source, directory)
    return [n for n in names if (source / n).exists()]


def copy_hf_files(names: list[str], source: Path, target: Path) -> None:
    """Copy the files `write_hf_files` wrote in `source` into a variant directory `target`."""
    for name in names:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, target / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, target / name)
