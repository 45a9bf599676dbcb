"""The KV-cache paths use transformers' current Cache API: no "`past_key_values` is deprecated ... Use
`cache` instead" (FutureWarning per call) and no "`past_key_values`/`cache_params` are deprecated"
(transformers logger) from the torch reference decoder, the host decoder's cache, the greedy-agreement
metric or the ONNX export wrapper — and the tokens they produce are still torch's greedy tokens."""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import pytest
import torch

DEPRECATED = "past_key_values"


@contextlib.contextmanager
def cache_deprecations():
    """Collects both deprecation messages (the FutureWarning and the logger's warning_once) as strings."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if DEPRECATED in record.getMessage():
                seen.append(record.getMessage())

    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is not None and hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()  # "once" per process: an earlier test must not hide this one's message
    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen += [str(w.message) for w in caught if DEPRECATED in str(w.message)]
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return path, model


def _prompt() -> np.ndarray:
    return np.array([[5, 17, 42, 99, 7, 63]], dtype=np.int64)


def _reference(model, prompt: np.ndarray, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.pad_token_id)
    return out[0, prompt.shape[1]:].tolist()


def test_detector_sees_the_deprecated_form(llama):
    """The check below is meaningful: the old keyword and the old output field are both reported."""
    _, model = llama
    with cache_deprecations() as seen, torch.no_grad():
        out = model(input_ids=torch.from_numpy(_prompt()), use_cache=True)
        model(input_ids=torch.tensor([[3]]), past_key_values=out.past_key_values, use_cache=True)
    assert any("Use `cache` instead" in m for m in seen), seen


def test_torch_reference_decoder_uses_cache_api(llama):
    from runtimes.decode.decoders import torch_greedy

    path, model = llama
    prompt = _prompt()
    with cache_deprecations() as seen:
        tokens = torch_greedy(path, prompt, np.ones_like(prompt), new_tokens=6)
    assert seen == []
    assert tokens == _reference(model, prompt, 6)


def test_agreement_greedy_uses_cache_api(llama):
    from compiler.agreement import greedy_continuation

    _, model = llama
    prompt = _prompt()
    with cache_deprecations() as seen:
        tokens = greedy_continuation(model, torch.from_numpy(prompt[0]), 5).tolist()
    assert seen == []
    assert tokens == _reference(model, prompt, 5)


def test_host_cache_uses_cache_api(llama):
    """The sparsec backend's decode cache (runtimes/kernels/host_runner.py) on a plain HF model."""
    from runtimes.kernels.host_runner import HostCache

    _, model = llama
    prompt = _prompt()
    with cache_deprecations() as seen:
        cache = HostCache(model, prompt, np.ones_like(prompt))
        tokens = [int(cache.prefill()[0].argmax())]
        for _ in range(4):
            tokens.append(int(cache.step([0], [tokens[-1]])[0].argmax()))
    assert seen == []
    assert tokens == _reference(model, prompt, 5)


def test_export_wrapper_uses_cache_api(llama, tmp_path):
    """Lowering a causal LM (export, KV layout probe, numerics vs torch through the wrapper)."""
    from compiler.lowering.lower import lower_model
    from compiler.trace import load_and_trace

    path, _ = llama
    ir = load_and_trace(str(path))
    with cache_deprecations() as seen:
        _, section = lower_model(ir, tmp_path / "onnx" / "model.onnx")
    assert seen == []
    assert max(section["numerics"].values()) < 1e-4
