"""Shared fixtures: tiny HF models of several architectures (built once per session), MiniLM, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from compiler.tiny_models import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """tiny_model_dir("llama") -> Path of a saved tiny model directory (cached per session)."""
    from compiler.tiny_models import build_tiny_model

    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), tokenizer=tiny_tokenizer)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compiler.trace import builtin_model_path

    return builtin_model_path("minilm")


@pytest.fixture
def cli():
    """Invoke the real click CLI in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from compiler.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


# -- CI: a skip is a failure ---------------------------------------------------------------------
# Tests skip where an optional runtime is missing (DeepSparse's venv, OpenVINO), which is right on a
# user's machine. CI installs every one of them, so there `SPARSEC_NO_SKIPS=1` (set by .ci/run)
# turns a skip into a failure: a broken install cannot pass as green.
def _no_skips() -> bool:
    return os.environ.get("SPARSEC_NO_SKIPS", "") not in ("", "0")


def _fail_skip(report) -> None:
    if report.skipped and _no_skips() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but SPARSEC_NO_SKIPS is set (CI installs every dependency): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())
