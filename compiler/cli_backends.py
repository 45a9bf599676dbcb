"""`sparsec backends install NAME`: create a backend's private virtualenv (today: deepsparse)."""

from __future__ import annotations

from pathlib import Path

import click

from compiler.errors import SparsecError


@click.command("install")
@click.argument("name")
@click.option("--python", "python", help="Interpreter to build the venv with (default: python3.X found on PATH).")
@click.option("--venv", "venv", type=click.Path(path_type=Path),
              help="Where to create it (default: $SPARSEC_DEEPSPARSE_VENV or ${SPARSEC_HOME:-~/.cache/sparsec}/venvs/NAME).")
@click.option("--force", is_flag=True, help="Recreate the venv if it exists.")
def install_cmd(name, python, venv, force):
    """Create the private virtualenv a backend runs in (its pins clash with sparsec's own)."""
    from runtimes.venvs import VENVS, find_python, install_venv, venv_dir, venv_status

    spec = VENVS.get(name)
    if spec is None:
        raise SparsecError(f"'{name}' has no private venv to install (only: {', '.join(sorted(VENVS))}); "
                           "other backends install into sparsec's environment — see `sparsec backends`")
    root = venv or venv_dir(spec)
    ok, reason = venv_status(spec, root)
    if ok and not force:
        click.echo(f"{name} is already installed: {reason} (--force recreates it)")
        return
    interpreter = find_python(spec, python)
    force = force or (root / "pyvenv.cfg").exists()  # a broken or unfinished venv is replaced
    click.echo(f"installing {name} into {root} with {interpreter}")
    install_venv(spec, interpreter, root, force=force, log=lambda step: click.echo(f"  {step} ..."))
    click.echo(f"{name} is ready in {root}")
    if venv and venv.resolve() != venv_dir(spec).resolve():
        click.echo(f"  note: set {spec.env_var}={root} so sparsec finds it")
    if spec.licence_notice:
        click.secho(f"licence: {spec.licence_notice}", fg="yellow", err=True)


def echo_licence_notices(backend_names, plugins=()) -> None:
    """On stderr, the licence notice of each backend about to be used (e.g. DeepSparse: evaluation only).
    Unknown names are left for the command itself to report."""
    from compiler.registry import Registry

    registry = Registry.default(plugins, kinds=("backend",))
    for name in backend_names:
        entry = registry.backends.get(name)
        notice = getattr(entry.obj, "licence_notice", None) if entry else None
        if notice:
            click.secho(f"licence ({name}): {notice}", fg="yellow", err=True)
