"""Registry: entry points (built-ins declared the same way), plugins, duplicate and import errors."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compiler import Registry
from compiler.errors import PluginError

ROOT = Path(__file__).resolve().parents[1]


def test_plugin_file_registers_pass():
    reg = Registry()
    reg.load_plugin(str(ROOT / "examples" / "custom_pass.py"))
    assert "threshold-prune" in reg.passes
    assert "examples/custom_pass.py" in reg.passes["threshold-prune"].origin


def test_two_plugins_defining_one_name_name_both_origins(tmp_path):
    src = textwrap.dedent("""
        from dataclasses import dataclass
        from compiler import Pass, PassResult, register_pass

        @register_pass
        @dataclass(frozen=True)
        class P(Pass):
            name = "same-name"
            def call(self, ir, ctx):
                return PassResult(ir, modified=False)
    """)
    (tmp_path / "one.py").write_text(src)
    (tmp_path / "two.py").write_text(src)
    reg = Registry()
    reg.load_plugin(str(tmp_path / "one.py"))
    with pytest.raises(PluginError) as err:
        reg.load_plugin(str(tmp_path / "two.py"))
    msg = str(err.value)
    assert "defined twice" in msg and "one.py" in msg and "two.py" in msg


def test_plugin_that_raises_on_import_carries_the_cause(tmp_path):
    (tmp_path / "boom.py").write_text("raise RuntimeError('kaboom at import')\n")
    with pytest.raises(PluginError) as err:
        Registry().load_plugin(str(tmp_path / "boom.py"))
    assert "RuntimeError: kaboom at import" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_plugin_without_passes_is_an_error(tmp_path):
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(PluginError, match="defines no class"):
        Registry().load_plugin(str(tmp_path / "empty.py"))


def test_missing_plugin_file():
    with pytest.raises(PluginError, match="does not exist"):
        Registry().load_plugin("no/such/plugin.py")


BUILTIN_PASSES = {"outlier-analysis", "sparsity-allocation", "prune", "nm-structure"}


def test_builtins_come_from_entry_points():
    reg = Registry.default()
    assert BUILTIN_PASSES <= set(reg.passes), "built-in passes are declared as sparsec.passes entry points"
    for name in BUILTIN_PASSES:
        assert reg.passes[name].origin.startswith(f"entry point sparsec.passes:{name} = passes.")
        assert "(sparsec " in reg.passes[name].origin


def test_installed_plugin_package_is_found_via_entry_point(tmp_path):
    """pip-install the example plugin package into a private target and list it with the real CLI."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "plugin_package")], check=True)
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "compiler.cli", "passes", "weight-stats"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "weight-stats" in out and "sparsec-example-plugin" in out and "eps" in out
