"""The pass contract (modelled on onnx-ir's pass infra and xDSL's dataclass passes).

A pass is a frozen dataclass: its fields are its options (in specs, recipes and `sparsec passes`).
`Pass.__call__` owns the contract: `requires(ir)`, then `call(ir, ctx)`, then `ensures(result.ir)`.
`PassResult.modified` is honest: True only when the module's weights or graph changed (plan edits
are decisions, not modifications, and keep analyses valid). Metrics and diagnostics go into the
report, never to stdout.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from compiler.errors import SpecError
from compiler.ir import ModelIR


@dataclass
class PassResult:
    ir: ModelIR
    modified: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    diagnostics: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may use besides the IR: calibration data, the seed, and a progress callback that
    instruments (rich progress bar) listen to. Holds no pass state between runs."""

    calibration: Any = None  # compiler.calibration.CalibrationSet, loaded lazily by the pipeline
    seed: int = 0
    progress: Callable[[str, int, int], None] = lambda what, done, total: None
    extras: dict[str, Any] = field(default_factory=dict)

    def require_calibration(self, pass_name: str):
        if self.calibration is None:
            raise SpecError(f"pass '{pass_name}' needs calibration data, but none is configured")
        return self.calibration() if callable(self.calibration) else self.calibration


@dataclass(frozen=True)
class Pass:
    """Base class of all passes. Subclasses set `name` (kebab-case) and implement `call`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # analyses still valid after this pass changes weights (the pipeline drops every other one)
    preserves: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values; raise SpecError with a one-line message. Called on construction."""

    def requires(self, ir: ModelIR) -> None:
        """Preconditions on the input IR; raise SpecError when unmet."""

    def ensures(self, ir: ModelIR) -> None:
        """Postconditions on the *result* IR."""

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        self.requires(ir)
        result = self.call(ir, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass '{self.name}' returned {type(result).__name__}, not PassResult")
        self.ensures(result.ir)
        return result

    # -- options ---------------------------------------------------------------------------------
    @classmethod
    def options(cls) -> list["PassOption"]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append(PassOption(f.name, hints.get(f.name, Any), default, f.metadata.get("help", "")))
        return out

    def option_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """Canonical `name{k=v,...}` with every option spelled out, in declaration order."""
        from compiler.spec import format_value

        items = [f"{k}={format_value(v)}" for k, v in self.option_values().items()]
        return f"{self.name}{{{','.join(items)}}}" if items else self.name


@dataclass(frozen=True)
class PassOption:
    name: str
    type: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        t = self.type
        origin = typing.get_origin(t)
        if origin is typing.Literal:
            return "|".join(str(a) for a in typing.get_args(t))
        if origin is not None:
            return str(t).replace("typing.", "")
        return getattr(t, "__name__", str(t))


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclasses.field
    """A pass option with a help text (shown by `sparsec passes NAME`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable (use tuples)")
    return field(default=default, metadata={"help": help})
