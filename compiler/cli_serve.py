"""`sparsec serve` and `sparsec package`: thin click shells over runtimes.serve.app / runtimes.serve.package."""

from __future__ import annotations

from pathlib import Path

import click

from compiler.cli_ray import replica_options, serve_replicas, wants_ray


@click.command("serve")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", default="onnxruntime", show_default=True, help="Backend that runs the lowered graph.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; use 0.0.0.0 to listen on all (explicitly).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Server processes (each loads the model).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="Inference threads per worker (0 = CPU cores / workers).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Most inputs grouped into one backend call.")
@click.option("--seqlen", type=click.IntRange(min=1), default=128, show_default=True,
              help="Static shapes (DeepSparse): the sequence length embeddings are padded to, and for completions the longest "
              "prompt and the most new tokens; dynamic backends ignore it.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Longest a request waits for a batch to fill (0 = never).")
@click.option("--max-queue", type=click.IntRange(min=1), default=2048, show_default=True, help="Queued inputs before answering 503.")
@click.option("--max-inputs", type=click.IntRange(min=1), default=None,
              help="Most inputs (texts, prompts) in one request, 400 above; at most --max-queue. [default: min(2048, --max-queue)]")
@click.option("--max-body-kb", type=click.IntRange(min=1), default=2048, show_default=True, help="Request body limit (413 above).")
@click.option("--api-key", envvar="SPARSEC_API_KEY", help="Require this key (Bearer) on /v1 routes; env SPARSEC_API_KEY (preferred: not in `ps`).")
@click.option("--model-name", help="Model id in /v1/models and responses (default: the artifact directory name).")
@click.option("--plugin", "plugins", multiple=True, help="Plugin file or module defining a backend (repeatable).")
@click.option("--graceful-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds in-flight requests get after SIGTERM.")
@click.option("--access-log/--no-access-log", default=True, show_default=True)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info", show_default=True)
@replica_options
def serve_cmd(artifact, backend, host, port, workers, threads, max_batch_size, seqlen, max_wait_ms, max_queue, max_inputs,
              max_body_kb, api_key, model_name, plugins, graceful_timeout, access_log, log_level,
              **ray_options):
    """Serve a compiled ARTIFACT over HTTP (OpenAI-compatible /v1/embeddings, /v1/completions and
    /v1/chat/completions, /v1/infer)."""
    from runtimes.serve.app import ServeConfig, check_bindable, serve
    from runtimes.serve.model import open_artifact

    config = ServeConfig(artifact=str(artifact), backend=backend, host=host, port=port, workers=workers, threads=threads,
                         max_batch_size=max_batch_size, seqlen=seqlen, max_wait_ms=max_wait_ms, max_queue=max_queue,
                         max_inputs=max_inputs, max_body_bytes=max_body_kb * 1024, api_key=api_key or None,
                         model_name=model_name,
                         plugins=tuple(plugins), graceful_timeout_s=graceful_timeout, access_log=access_log,
                         log_level=log_level)
    from compiler.cli_backends import echo_licence_notices

    target = open_artifact(artifact, backend, tuple(plugins))
    check_bindable(host, port)
    echo_licence_notices([backend], tuple(plugins))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.secho(f"warning: listening on {host} without an API key (set SPARSEC_API_KEY)", fg="yellow", err=True)
    click.echo(f"serving {artifact} ({target.task}, backend {backend}) on http://{host}:{port}", err=True)
    if wants_ray(ray_options):  # --replicas & co: the same app on Ray Serve (runtimes/serve/ray_deploy.py)
        return serve_replicas(config, ray_options)
    serve(config, target)


@click.command("package")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle to write (.tar.gz).")
@click.option("--backend", default="onnxruntime", show_default=True, help="Backend the bundle will serve with.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def package_cmd(artifact, out, backend, force):
    """Bundle ARTIFACT with pinned runtime requirements and a start script into a deployable .tar.gz."""
    from runtimes.serve.package import package_artifact

    result = package_artifact(artifact, out, backend=backend, force=force)
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, sha256 {result.sha256[:16]}...): "
               f"tar xzf it, then ./{result.root}/start.sh")
