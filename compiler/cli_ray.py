"""The Ray Serve options of `sparsec serve` (kept here so compiler/cli_serve.py only gains a decorator
and one branch): `--replicas N` serves the same app on N Ray Serve replicas (runtimes/serve/ray_deploy.py)."""

from __future__ import annotations

from typing import Any, Callable

import click


def replica_options(f: Callable) -> Callable:
    options = [
        click.option("--replicas", type=int, help="Serve with Ray Serve on N replicas (each loads the model); "
                     "the initial count when --min/--max-replicas autoscale."),
        click.option("--min-replicas", type=int, help="Ray Serve autoscaling: fewest replicas."),
        click.option("--max-replicas", type=int, help="Ray Serve autoscaling: most replicas."),
        click.option("--cpus-per-replica", type=float, help="CPUs Ray reserves per replica (default 1; also its threads)."),
        click.option("--ray-address", help="Existing Ray cluster (e.g. auto, ray://head:10001); default: a local Ray instance."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def wants_ray(ray_options: dict[str, Any]) -> bool:
    return any(v is not None for v in ray_options.values())


def serve_replicas(config: Any, ray_options: dict[str, Any]) -> None:
    from runtimes.serve.ray_deploy import ReplicaOptions, serve_on_ray

    min_r, max_r = ray_options.get("min_replicas"), ray_options.get("max_replicas")
    replicas = ray_options.get("replicas")
    if replicas is None:  # autoscaling bounds alone: start at the lower bound (at least 1)
        replicas = max(1, min_r or 0) if max_r is None else min(max(1, min_r or 0), max_r)
    options = ReplicaOptions(replicas=replicas, min_replicas=min_r, max_replicas=max_r,
                             cpus_per_replica=ray_options.get("cpus_per_replica") or 1.0, address=ray_options.get("ray_address"))
    serve_on_ray(config, options, lambda line: click.echo(line, err=True))
