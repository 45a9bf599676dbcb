"""Helpers shared by the sparsity-pass tests: load a tiny model as IR and run a pipeline spec on it."""

from __future__ import annotations

from compiler.calibration import CalibrationConfig, build_calibration
from compiler.ir import ModelIR
from compiler.pass_infra import PassContext
from compiler.pipeline import Pipeline, PipelineRun
from compiler.registry import Registry
from compiler.trace import load_and_trace


def load_ir(path) -> ModelIR:
    return load_and_trace(str(path))


def context(ir: ModelIR, samples: int = 4, seqlen: int = 32, calibrate: bool = True) -> PassContext:
    if not calibrate:
        return PassContext()
    calib = build_calibration(ir, CalibrationConfig(samples=samples, seqlen=seqlen))
    return PassContext(calibration=calib)


def run_spec(ir: ModelIR, spec: str, samples: int = 4, seqlen: int = 32, calibrate: bool = True) -> PipelineRun:
    pipeline = Pipeline.from_spec(spec, Registry.default())
    return pipeline.run(ir, context(ir, samples, seqlen, calibrate))


def block_layers(ir: ModelIR) -> list[str]:
    return [n for n, l in ir.layers.items() if l.block is not None]
