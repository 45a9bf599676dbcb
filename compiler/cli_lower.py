"""`sparsec lower ARTIFACT --backend B[,B2]`: lower an artifact compiled without `--backend`, in place.

`verify`, `bench` and `serve` run lowered graphs; an artifact compiled without `--backend` has none, and
recompiling from scratch (18 minutes on SmolLM2) only to lower it wastes the compile. This command reloads
the compiled model from `ARTIFACT/model`, restores its plan from the manifest, and runs the same lowering
as `compile --backend` (the ONNX export and int8/int4 variants, then each backend's own `Backend.lower`).

Atomic: the new artifact is assembled in a sibling temp directory (the unchanged `model/` files hard-linked,
never written) and renamed into place; a failure or Ctrl-C leaves ARTIFACT as it was. Backends lowered
before are lowered again with the new ones, so none loses its files; the manifest records them in
`lowering.lowered_for`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import click

from compiler.errors import BackendUnavailable, SparsecError

MODEL_DIR = "model"


@click.command("lower")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", "backends", required=True, help="Comma-separated backends to lower for, e.g. onnxruntime,sparsec.")
def lower_cmd(artifact, backends):
    """Lower ARTIFACT (compiled without --backend) for backends, in place; then `sparsec verify` runs it."""
    from compiler.artifact import Artifact
    from runtimes.registry_helpers import check_backends_available

    names = parse_backends(backends)
    art = Artifact.load(artifact)
    art.require_full("lower")
    registry = registry_with(names)
    check_backends_available(registry, names)
    _check_quant_forms(art.manifest, names, registry)
    section = lower_in_place(art, names, registry)
    files = ", ".join(sorted({section["files"]["model"], *section.get("backend_files", {}).values()}))
    click.echo(f"lowered {art.root} for {', '.join(section['lowered_for'])}: {files}")
    click.echo(f"  next: sparsec verify {art.root} --backend {','.join(names)}")


def parse_backends(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    if not names:
        raise SparsecError("--backend: no backend named")
    return names


def registry_with(names: tuple[str, ...]):
    """The registry, with unknown backend names reported like unavailable ones (exit 3)."""
    from compiler.registry import Registry

    reg = Registry.default()
    unknown = [n for n in names if n not in reg.backends]
    if unknown:
        raise BackendUnavailable(f"unknown backend '{unknown[0]}' (known: {', '.join(sorted(reg.backends))}); "
                                 f"`sparsec backends` lists them with install commands")
    return reg


def lowered_for(manifest: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """Backends an artifact is lowered for: recorded by `sparsec lower`, else (compile --backend) the verified ones."""
    lowering = manifest.get("lowering") or {}
    if not lowering:
        return []
    return list(lowering.get("lowered_for") or report.get("backends") or [])


def _check_quant_forms(manifest: dict[str, Any], names: tuple[str, ...], registry: Any) -> None:
    from compiler.lowering.quant import backends_without_form

    schemes = {p.get("quant") for p in manifest.get("plan", {}).values() if p.get("quant")}
    for scheme in schemes:
        missing = backends_without_form(scheme, names, registry)
        if missing:
            raise SparsecError(f"the artifact is quantized {scheme}, which backend {', '.join(missing)} does not run")


def lower_in_place(art: Any, names: tuple[str, ...], registry: Any) -> dict[str, Any]:
    """Lower `art` for `names` (+ the backends it was lowered for) and swap it in atomically; returns the
    manifest's new `lowering` section."""
    from compiler.artifact import ArtifactWriter
    from compiler.lowering.lower import lower_artifact
    from runtimes.base import lower_for_backends

    manifest = dict(art.manifest)
    wanted = tuple(dict.fromkeys([*lowered_for(manifest, art.report), *names]))
    ir = _compiled_ir(art)
    calib = _calibration(ir, manifest)
    old_lowered = _lowered_paths(manifest)
    with ArtifactWriter(art.root, force=True) as writer:
        root = writer.root
        assert root is not None  # set by __enter__
        _populate(art.root, root, skip=old_lowered)
        section = lower_artifact(ir, root, wanted, calib=calib, registry=registry)
        lower_for_backends(registry, wanted, root, section, manifest["plan"], {})
        section["lowered_for"] = list(wanted)
        manifest["lowering"] = section
        writer.commit(manifest)
    art.manifest = manifest
    return section


def _compiled_ir(art: Any) -> Any:
    """The compiled model from ARTIFACT/model with the manifest's plan (quantization decisions included)."""
    from compiler.ir import LayerPlan
    from compiler.trace import load_and_trace

    source = art.manifest.get("source") or {}
    if source.get("model_type") == "module" or not (art.root / MODEL_DIR / "config.json").is_file():
        raise SparsecError(f"artifact '{art.root}' holds a plain module (no Hugging Face model/ directory): it cannot be "
                           "lowered after compile; compile it again with --backend")
    ir = load_and_trace(str(art.root / MODEL_DIR), tokenizer=_tokenizer_for(art))
    plan = art.manifest.get("plan") or {}
    if set(plan) != set(ir.layers):
        raise SparsecError(f"artifact '{art.root}': the manifest's plan does not match the layers of its model/")
    ir.plan = {name: LayerPlan(**p) for name, p in plan.items()}
    return ir


def _tokenizer_for(art: Any) -> str | None:
    """model/ carries the tokenizer when compile had one; older artifacts of bare models name it in the manifest."""
    from compiler.calibration import TOKENIZER_FILES

    if any((art.root / MODEL_DIR / f).is_file() for f in TOKENIZER_FILES):
        return None
    return (art.manifest.get("source") or {}).get("tokenizer")


def _calibration(ir: Any, manifest: dict[str, Any]) -> Any:
    """The compile's calibration samples again (static int8 variants need them), from the manifest settings."""
    from compiler.calibration import UNTOKENIZED_SOURCES, CalibrationConfig, build_calibration
    from compiler.lowering.quant import planned_scheme

    if not planned_scheme(ir):
        return None
    cal = manifest.get("calibration") or {}
    source = cal.get("source", "default")
    cfg = CalibrationConfig(source="default" if source in UNTOKENIZED_SOURCES else source,
                            samples=int(cal.get("samples", 32)), seqlen=int(cal.get("seqlen", 128)), seed=int(cal.get("seed", 0)))
    return build_calibration(ir, cfg)


def _lowered_paths(manifest: dict[str, Any]) -> set[str]:
    """Top-level paths written by an earlier lowering (replaced, not copied)."""
    lowering = manifest.get("lowering") or {}
    rels = {"onnx/", *lowering.get("files", {}).values(), *lowering.get("backend_files", {}).values()}
    return {rel.split("/")[0] for rel in rels if rel}


def _populate(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the artifact into the temp directory: model/ hard-linked (lowering only reads it), the rest copied;
    manifest.json is written fresh by the commit."""
    from compiler.artifact import MANIFEST

    for entry in sorted(src.iterdir()):
        if entry.name in skip or entry.name == MANIFEST:
            continue
        target = dst / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=_link_or_copy if entry.name == MODEL_DIR else shutil.copy2)
        else:
            shutil.copy2(entry, target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
