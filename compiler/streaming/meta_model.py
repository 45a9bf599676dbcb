"""Build a Hugging Face model from its config with every parameter on the meta device.

Parameters cost nothing there (shapes and dtypes only); buffers are created normally on the CPU,
because non-persistent ones (rotary `inv_freq`, position ids) are computed in `__init__` and are not
in the checkpoint. This is what `accelerate.init_empty_weights(include_buffers=False)` does, without
the dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":  # a tied (already meta) parameter stays shared
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)  # noqa: SLF001 - as accelerate does

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_meta_model(config: Any, task: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model class `trace` would load for `task`, with meta parameters (weights not read)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification}.get(task, AutoModel)
    with parameters_on_meta():
        module = auto.from_config(config, dtype=dtype)
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    return module


def meta_like(p: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
