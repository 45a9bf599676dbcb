"""Spec strings and recipes: parsing, coercion, canonical round-trip, errors."""

from dataclasses import dataclass
from typing import Literal

import pytest

from compiler import Pass, PassResult, Pipeline, Recipe, Registry, option, register_pass
from compiler.errors import SpecError
from compiler.spec import parse_spec


@register_pass
@dataclass(frozen=True)
class Alpha(Pass):
    name = "alpha"
    ratio: float = option(0.5, "a ratio")
    mode: Literal["a", "b"] = option("a", "a choice")
    flag: bool = option(False, "a flag")
    patterns: tuple[str, ...] = option(("x.*", "lm_head"), "regexes")
    label: str = option("", "free text")

    def validate(self):
        if not 0 <= self.ratio < 1:
            raise SpecError(f"ratio must be in [0, 1), got {self.ratio}")

    def call(self, ir, ctx):
        return PassResult(ir, modified=False)


@register_pass
@dataclass(frozen=True)
class Beta(Pass):
    name = "beta"

    def call(self, ir, ctx):
        return PassResult(ir, modified=False)


@pytest.fixture
def registry():
    reg = Registry()
    reg.add("pass", Alpha, "test")
    reg.add("pass", Beta, "test")
    return reg


def test_parse_spec_names_and_options():
    specs = parse_spec('alpha{ratio=0.7, mode=b, label="a,b}c"} , beta')
    assert [s.name for s in specs] == ["alpha", "beta"]
    assert specs[0].options == {"ratio": "0.7", "mode": "b", "label": "a,b}c"}


def test_coercion_and_canonical_round_trip(registry):
    p = Pipeline.from_spec('alpha{ratio=0.7,mode=b,flag=true,patterns="q;k",label="hello world"},beta', registry)
    a = p.passes[0]
    assert (a.ratio, a.mode, a.flag, a.patterns, a.label) == (0.7, "b", True, ("q", "k"), "hello world")
    canonical = p.spec()
    assert canonical.startswith("alpha{ratio=0.7,mode=b,flag=true,")
    again = Pipeline.from_spec(canonical, registry)
    assert again == p
    assert again.spec() == canonical


def test_defaults_round_trip(registry):
    p = Pipeline.from_spec("alpha,beta", registry)
    assert Pipeline.from_spec(p.spec(), registry) == p


@pytest.mark.parametrize("text, fragment", [
    ("gamma", "unknown pass 'gamma'"),
    ("alpha{ratio=abc}", "option 'ratio': invalid value 'abc'"),
    ("alpha{nope=1}", "has no option 'nope'"),
    ("alpha{ratio=1.5}", "ratio must be in [0, 1)"),
    ("alpha{mode=c}", "option 'mode'"),
    ("alpha{ratio=0.1", "expected"),
    ("alpha beta", "unexpected"),
    ("", "expected a pass name"),
])
def test_spec_errors_are_one_line(registry, text, fragment):
    with pytest.raises(SpecError) as err:
        Pipeline.from_spec(text, registry)
    assert fragment in str(err.value)
    assert "\n" not in err.value.one_line()


def test_recipe_round_trip(registry, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("pipeline:\n  - alpha: {ratio: 0.25, patterns: [a, b]}\n  - beta\ncalibration: {samples: 8}\n")
    recipe = Recipe.load(path, registry)
    assert recipe.pipeline.passes[0].ratio == 0.25
    assert recipe.pipeline.passes[0].patterns == ("a", "b")
    assert recipe.settings["calibration"] == {"samples": 8}
    dumped = tmp_path / "d.yaml"
    dumped.write_text(recipe.dump())
    again = Recipe.load(dumped, registry)
    assert again.pipeline == recipe.pipeline and again.settings == recipe.settings


@pytest.mark.parametrize("content, fragment", [
    ("pipeline: [alpha: {ratio: 0.5}\n", "not valid YAML"),
    ("- alpha\n", "a recipe is a mapping"),
    ("pipeline: [alpha]\nbogus: 1\n", "unknown keys"),
    ("pipeline: [{alpha: 3}]\n", "must be a mapping"),
])
def test_bad_recipes(registry, tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SpecError) as err:
        Recipe.load(path, registry)
    assert fragment in str(err.value)
