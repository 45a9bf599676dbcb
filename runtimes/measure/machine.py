"""The machine a measurement ran on: what a reader needs to judge a speed claim.

A speedup is a property of (artifact, backend, machine, load). The record keeps the CPU model and the
ISA features our kernels and the runtimes dispatch on (AVX-512 VNNI/VBMI2/BF16, AMX), the cores this
process may use, the threads asked for, the load average before and after, and the runtime versions.
`same_machine` lets `inspect` label a figure measured elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

# The ISA features that change which kernels run (and so the absolute figures).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi2", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
RUNTIME_DISTRIBUTIONS = ("torch", "onnxruntime", "openvino", "transformers", "numpy")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _versions() -> dict[str, str]:
    out = {}
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


@dataclass
class MachineRecord:
    cpu_model: str
    isa: list[str]
    logical_cpus: int
    usable_cpus: int
    python: str
    versions: dict[str, str]
    load_before: float | None
    load_after: float | None = None
    threads: int | None = None
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> "MachineRecord":
        """Record the load average once the measurement is over."""
        self.load_after = load_average()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        isa = ",".join(f for f in self.isa if f.startswith(("avx512_vnni", "avx512_vbmi2", "avx512_bf16", "amx_int8")))
        load = f"load {self.load_before:.2f}→{self.load_after:.2f}" if self.load_before is not None and self.load_after is not None else ""
        return f"{self.cpu_model} ({self.usable_cpus} cpus, {isa or 'no avx512-vnni/amx'}) {load}".strip()


def record_machine(threads: int | None = None) -> MachineRecord:
    model, flags = _cpuinfo()
    isa = [f for f in ISA_FLAGS if f in flags]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count() or 1
    logical = os.cpu_count() or usable
    fingerprint = hashlib.sha256(f"{model}|{','.join(isa)}|{logical}".encode()).hexdigest()[:16]
    return MachineRecord(cpu_model=model, isa=isa, logical_cpus=logical, usable_cpus=usable,
                         python=platform.python_version(), versions=_versions(), load_before=load_average(),
                         threads=threads, fingerprint=fingerprint)


def same_machine(record: dict[str, Any] | None) -> bool:
    """True when `record` (a stored MachineRecord dict) describes this machine's CPU."""
    if not record:
        return False
    return record.get("fingerprint") == record_machine().fingerprint
