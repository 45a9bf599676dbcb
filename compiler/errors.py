"""Typed errors. Every user mistake is a `SparsecError`: the CLI prints its message on one line and
exits with its `exit_code`; no traceback. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class SparsecError(Exception):
    """Base class of errors caused by input (model, spec, recipe, data, plugin, artifact)."""

    exit_code: int = 1

    def one_line(self) -> str:
        return " ".join(str(self).split())


class ModelLoadError(SparsecError):
    """The MODEL argument could not be loaded."""


class SpecError(SparsecError):
    """A pipeline spec, recipe or pass option is malformed or invalid."""


class CalibrationError(SparsecError):
    """Calibration data is missing, empty, undecodable or too short."""


class PluginError(SparsecError):
    """A plugin failed to import, or two origins define the same name."""


class ArtifactError(SparsecError):
    """An artifact directory is missing, exists already, or fails its sha256 manifest."""


class NumericsError(SparsecError):
    """NaN/Inf found in weights or activations (names the layer)."""


class PassError(SparsecError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.before = list(before)
        self.cause = cause
        prior = ", ".join(before) if before else "none"
        detail = cause.one_line() if isinstance(cause, SparsecError) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"pass '{pass_name}' failed (after: {prior}): {detail}")
        if isinstance(cause, SparsecError):
            self.exit_code = cause.exit_code


class VerificationFailed(SparsecError):
    """A verification gate (accuracy, speedup) was missed."""

    exit_code = 2


class MeasurementInconclusive(SparsecError):
    """A speed gate could not be decided: the machine was too noisy for the speedup interval to be
    narrow enough (runtimes/measure/speedup.py). Not a pass, not a miss: measure again when quiet."""

    exit_code = 4


def raise_for_gates(results: dict, where: str) -> None:
    """Exit 2 when a gate was missed, 4 when the only failures are inconclusive speed measurements."""
    failed = {n: r["gates"]["failures"] for n, r in results.items() if not r.get("passed", True)}
    if not failed:
        return
    detail = "; ".join(f"{n}: {', '.join(f)}" for n, f in failed.items())
    only_inconclusive = all(all(x.startswith("speedup inconclusive") for x in f) for f in failed.values())
    if only_inconclusive:
        raise MeasurementInconclusive(f"speed gate undecided (machine too noisy), {where}: {detail}")
    raise VerificationFailed(f"verification gates missed, {where}: {detail}")


class BackendUnavailable(SparsecError):
    """A requested backend is not installed here; the message says how to install it."""

    exit_code = 3
