"""Lowered artifacts load as they are in optimum (optimum-onnx 0.1.0, transformers 4.57, in its own venv:
`sparsec backends install optimum`), and give what sparsec's own runs of the same files give.

- the pretrained MiniLM (a sentence encoder), 50% pruned and lowered: `ORTModelForFeatureExtraction`
  + `AutoTokenizer` on `ART/onnx` → the same token ids and hidden states as sparsec's onnxruntime
  runner, and the sentence-transformers pooling config beside the graph;
- a tiny Llama (RoPE theta 100, not the default, so a config that loses it is caught), 50% pruned,
  int8-dynamic planned: `ORTModelForCausalLM` + greedy `generate` on `ART/onnx` and on the int8 variant
  (`subfolder="int8-dynamic"`) → the same tokens as sparsec's decoder on each file.

The probe (tests/optimum_probe.py) runs with the venv's interpreter; without the venv the tests skip
and say how to create it (CI builds it in `make venv`, where SPARSEC_NO_SKIPS=1 makes a skip fail).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from lowering_helpers import prune_half

PROBE = Path(__file__).with_name("optimum_probe.py")
TEXTS = ["sparsec compiles sparse models that really run faster.", "A short one.",
         "Pooling turns token states into one sentence embedding, as modules.json says."]
PROMPT = "def parse(text):"
NEW_TOKENS = 8
ROPE_THETA = 100.0


@pytest.fixture(scope="module")
def optimum_python() -> Path:
    from runtimes.venvs import OPTIMUM, venv_dir, venv_python, venv_status

    ok, reason = venv_status(OPTIMUM)
    if not ok:
        pytest.skip(f"optimum venv absent ({reason}); create it with `sparsec backends install optimum`")
    return venv_python(venv_dir(OPTIMUM))


@pytest.fixture(scope="module")
def encoder_artifact(minilm_dir, tmp_path_factory):
    from compiler.lowering.lower import lower_artifact
    from compiler.trace import load_and_trace

    ir = load_and_trace(str(minilm_dir))
    prune_half(ir)
    root = tmp_path_factory.mktemp("optimum-encoder")
    return root, lower_artifact(ir, root)


@pytest.fixture(scope="module")
def lm_artifact(tiny_tokenizer, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from compiler.lowering.lower import lower_artifact
    from compiler.tiny_models import tiny_config
    from compiler.trace import load_and_trace

    src = tmp_path_factory.mktemp("optimum-llama-src")
    config = tiny_config("llama", vocab_size=len(tiny_tokenizer))
    config.rope_parameters = {"rope_type": "default", "rope_theta": ROPE_THETA}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    ir = load_and_trace(str(src))
    prune_half(ir)
    for name, layer in ir.layers.items():
        if layer.block is not None:
            ir.plan[name].quant = "int8-dynamic"
    root = tmp_path_factory.mktemp("optimum-llama")
    return root, lower_artifact(ir, root, backends=("onnxruntime",))


@pytest.fixture(scope="module")
def probe(optimum_python, encoder_artifact, lm_artifact, tmp_path_factory):
    """One run of the probe in the optimum venv over both artifacts: (summary, arrays)."""
    enc_root, _ = encoder_artifact
    lm_root, lm_section = lm_artifact
    variant = Path(lm_section["backend_files"]["onnxruntime"]).parent.name
    work = tmp_path_factory.mktemp("optimum-probe")
    job = {"encoder": str(enc_root / "onnx"), "texts": TEXTS, "lm": str(lm_root / "onnx"),
           "lm_subfolders": ["", variant], "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    (work / "job.json").write_text(json.dumps(job))
    from runtimes.venvs import worker_env

    proc = subprocess.run([str(optimum_python), str(PROBE), str(work / "job.json"), str(work / "out.npz")],
                          capture_output=True, text=True, timeout=600, env=worker_env({"HF_HUB_OFFLINE": "1"}))
    assert proc.returncode == 0, f"optimum probe failed:\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(work / "out.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return summary, arrays


def test_probe_ran_under_transformers_4(probe):
    summary, _ = probe
    assert summary["versions"]["transformers"].startswith("4.57.")
    assert summary["versions"]["optimum-onnx"] == "0.1.0"


def test_encoder_loads_in_optimum_and_matches_sparsec(probe, encoder_artifact, minilm_dir):
    from compiler.lowering.feeds import encoder_feeds
    from runtimes.base import RunnerOptions
    from runtimes.measure.inputs import load_tokenizer
    from runtimes.onnxruntime_backend import OnnxRuntimeBackend

    summary, arrays = probe
    root, section = encoder_artifact
    enc = summary["encoder"]
    assert enc["model_class"] == "ORTModelForFeatureExtraction" and enc["tokenizer_class"] == "BertTokenizerFast"
    # the pooling config travelled with the graph, as the source had it
    assert enc["pooling"] == json.loads((minilm_dir / "1_Pooling" / "config.json").read_text())
    assert (root / "onnx" / "modules.json").read_text() == (minilm_dir / "modules.json").read_text()
    # same token ids as sparsec's tokenizer (transformers 5) on the same files
    tok = load_tokenizer(root)
    batch = tok(TEXTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(arrays["enc_ids"], batch["input_ids"])
    np.testing.assert_array_equal(arrays["enc_mask"], batch["attention_mask"])
    # same hidden states as sparsec's onnxruntime runner, on every real token
    with OnnxRuntimeBackend().runner(root / "onnx" / "model.onnx", RunnerOptions(threads=2)) as runner:
        ours = runner.infer(encoder_feeds(section, batch["input_ids"], batch["attention_mask"]))["last_hidden_state"]
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(arrays["enc_hidden"][valid] - ours[valid]).max() < 1e-4


def _sparsec_greedy(root: Path, rel_file: str, section: dict, ids: np.ndarray, eos: int, workdir: Path) -> list[int]:
    import contextlib

    from runtimes.decode.decoders import DecodeOptions, open_decoder
    from runtimes.onnxruntime_backend import OnnxRuntimeBackend

    opts = DecodeOptions(prompt_len=ids.shape[1], new_tokens=NEW_TOKENS, threads=2, cache="dynamic")
    with contextlib.closing(open_decoder(OnnxRuntimeBackend(), root / rel_file, section, opts, workdir)) as decoder:
        return list(decoder.generate(ids, np.ones_like(ids), NEW_TOKENS, stop_ids=(eos,)).tokens)


@pytest.mark.parametrize("which", [0, 1], ids=["fp32", "int8-dynamic"])
def test_causal_lm_generates_in_optimum_like_sparsec(probe, lm_artifact, tmp_path, which):
    from runtimes.measure.inputs import load_tokenizer

    summary, arrays = probe
    root, section = lm_artifact
    lm = summary[f"lm{which}"]
    rel_file = section["files"]["model"] if which == 0 else section["backend_files"]["onnxruntime"]
    assert lm["model_class"] == "ORTModelForCausalLM" and lm["can_use_cache"] and lm["use_cache"]
    assert lm["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert lm["session_file"] == Path(rel_file).relative_to("onnx").as_posix()  # the file asked for, not another
    assert lm["rope_theta"] == ROPE_THETA and lm["rope_scaling"] is None  # transformers 4 reads our RoPE
    prompt = load_tokenizer(root)(PROMPT, return_tensors="np")["input_ids"].astype(np.int64)
    np.testing.assert_array_equal(arrays[f"lm{which}_prompt"], prompt)
    ours = _sparsec_greedy(root, rel_file, section, prompt, int(lm["eos_token_id"]), tmp_path)
    assert arrays[f"lm{which}_tokens"].tolist() == ours


def test_venv_installed_for_other_pins_is_not_used(tmp_path):
    """A venv whose marker records other pins than the spec's (sparsec was upgraded) is reported stale,
    with the command that rebuilds it, instead of running the probe on the old versions."""
    import os
    import sys

    from runtimes.venvs import MARKER, OPTIMUM, venv_python, venv_status

    python = venv_python(tmp_path)
    python.parent.mkdir(parents=True)
    os.symlink(sys.executable, python)
    (tmp_path / MARKER).write_text(json.dumps({"name": "optimum", "requirements": ["optimum-onnx==0.0.1"]}))
    ok, reason = venv_status(OPTIMUM, tmp_path)
    assert not ok and "optimum-onnx==0.0.1" in reason and "sparsec backends install optimum --force" in reason
    (tmp_path / MARKER).write_text(json.dumps({"name": "optimum", "requirements": list(OPTIMUM.requirements)}))
    assert venv_status(OPTIMUM, tmp_path)[1] != reason  # same pins: on to the import probe
