"""The generic top-level names (compiler, passes, runtimes) must resolve to *our* tree."""

from pathlib import Path

import compiler
import passes
import runtimes

ROOT = Path(__file__).resolve().parents[1]


def test_packages_live_in_this_tree():
    for pkg in (compiler, passes, runtimes):
        assert Path(pkg.__file__).resolve().parent.parent == ROOT, pkg.__file__


def test_public_plugin_api():
    from compiler import Pass, PassResult, register_pass  # noqa: F401 - the documented import

    assert callable(register_pass)
