"""Pipelines: an ordered tuple of passes, built from a spec string or a YAML recipe.

`Pipeline.spec()` prints the canonical form (every option spelled out); parsing it back yields an
equal pipeline. Running it applies instruments around each pass, invalidates analyses after a pass
that modified the weights, and wraps failures in a PassError naming the pass and those before it.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compiler.errors import PassError, SparsecError, SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult
from compiler.registry import Registry
from compiler.spec import coerce, load_yaml_file, parse_spec


def build_pass(registry: Registry, name: str, raw: dict[str, Any]) -> Pass:
    cls = registry.get_pass(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise SpecError(f"pass '{name}' has no option '{key}' (options: {known})")
        values[key] = coerce(value, hints[key], f"pass '{name}' option '{key}'")
    try:
        return cls(**values)
    except SparsecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"pass '{name}': {exc}") from exc


@dataclass
class PassRecord:
    name: str
    spec: str
    seconds: float
    modified: bool
    metrics: dict[str, Any]
    diagnostics: list[str]


@dataclass
class PipelineRun:
    ir: ModelIR
    records: list[PassRecord] = field(default_factory=list)
    analyses: dict[str, Any] = field(default_factory=dict)  # every analysis produced, kept for the manifest


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[Pass, ...]

    @classmethod
    def from_spec(cls, text: str, registry: Registry) -> "Pipeline":
        return cls(tuple(build_pass(registry, p.name, p.options) for p in parse_spec(text)))

    @classmethod
    def from_list(cls, items: list[Any], registry: Registry) -> "Pipeline":
        """From a recipe's `pipeline:` list: each item `name`, `{name: {options}}` or a spec string."""
        passes: list[Pass] = []
        for item in items:
            if isinstance(item, str):
                passes.extend(cls.from_spec(item, registry).passes)
            elif isinstance(item, dict) and len(item) == 1:
                (name, opts), = item.items()
                if opts is not None and not isinstance(opts, dict):
                    raise SpecError(f"recipe: options of pass '{name}' must be a mapping, got {type(opts).__name__}")
                passes.append(build_pass(registry, str(name), opts or {}))
            else:
                raise SpecError(f"recipe: each pipeline item must be a pass name or {{name: {{options}}}}, got {item!r}")
        return cls(tuple(passes))

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    def run(self, ir: ModelIR, ctx: PassContext, instruments: list[Any] = ()) -> PipelineRun:
        run = PipelineRun(ir=ir)
        done: list[str] = []
        previous_progress = ctx.progress

        def progress(what: str, n: int, total: int) -> None:
            for inst in instruments:
                inst.on_progress(what, n, total)
            previous_progress(what, n, total)

        ctx = dataclasses.replace(ctx, progress=progress)
        for inst in instruments:
            start_hook = getattr(inst, "on_pipeline_start", None)
            if start_hook:
                start_hook(self)
        for p in self.passes:
            for inst in instruments:
                inst.before_pass(p, run.ir)
            start = time.perf_counter()
            try:
                result: PassResult = p(run.ir, ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is attributed to its pass
                raise PassError(p.name, done, exc) from exc
            seconds = time.perf_counter() - start
            for inst in instruments:
                inst.after_pass(p, result, seconds)
            run.records.append(PassRecord(p.name, p.spec(), seconds, result.modified, dict(result.metrics), list(result.diagnostics)))
            run.analyses.update(result.ir.analyses)
            if result.modified:
                keep = set(p.preserves)
                result.ir.analyses = {k: v for k, v in result.ir.analyses.items() if k in keep}
                result.ir.refresh_measured_sparsity()
            run.ir = result.ir
            done.append(p.name)
        return run


@dataclass(frozen=True)
class Recipe:
    """A YAML recipe: the pipeline plus compile settings (calibration, backends, quantization)."""

    pipeline: Pipeline
    settings: dict[str, Any]

    ALLOWED = ("pipeline", "calibration", "backends", "seed", "verify")

    @classmethod
    def load(cls, path: str | Path, registry: Registry) -> "Recipe":
        return cls.from_dict(load_yaml_file(path, "recipe"), registry, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, registry: Registry, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict) or "pipeline" not in data:
            raise SpecError(f"{where}: a recipe is a mapping with a 'pipeline' list")
        unknown = set(data) - set(cls.ALLOWED)
        if unknown:
            raise SpecError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(cls.ALLOWED)})")
        items = data["pipeline"]
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list):
            raise SpecError(f"{where}: 'pipeline' must be a list")
        pipeline = Pipeline.from_list(items, registry)
        settings = {k: v for k, v in data.items() if k != "pipeline"}
        return cls(pipeline, settings)

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": [{p.name: p.option_values()} for p in self.pipeline.passes], **self.settings}

    def dump(self) -> str:
        def plain(v):
            return list(v) if isinstance(v, tuple) else v
        data = self.to_dict()
        data["pipeline"] = [{n: {k: plain(v) for k, v in o.items()}} for item in data["pipeline"] for n, o in item.items()]
        return yaml.safe_dump(data, sort_keys=False)
