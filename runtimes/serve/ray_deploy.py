"""`sparsec serve ARTIFACT --replicas N`: the same FastAPI app (`create_app`) behind Ray Serve.

Each replica is a Ray actor that verifies and loads the artifact itself and runs the app built by
`create_app` — same routes, API key, limits, batching and Prometheus metrics — through Ray Serve's
documented late-bound ASGI ingress (`serve.ingress()` on a class defining `__serve_build_asgi_app__`,
evaluated on the replica). Ray Serve's HTTP proxy listens on --host/--port and spreads requests over
the replicas; with --min-replicas/--max-replicas, Serve's autoscaler adds and removes replicas by the
number of ongoing requests per replica.

Two things are added around the app, not changed in it:
- every response carries `X-Sparsec-Replica` (the replica's Serve id), and each replica's /metrics
  carries its pid as the `worker` label, so load spread can be seen from outside;
- a replica reports its ASGI start-up complete only once the model is loaded and warm, so Serve never
  routes a request to a replica that would answer 503 "loading", and `serve.run` returns when every
  replica is ready (a load failure fails the deployment instead).
Ray's own resources stay small on one machine: no dashboard, a 128 MB object store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

from compiler.errors import SparsecError
from runtimes.serve.app import ServeConfig

APP_NAME = "sparsec"
REPLICA_HEADER = b"x-sparsec-replica"
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024
READY_TIMEOUT_S = 600.0  # a replica whose model is not warm by then fails its start-up


class ReplicaOptionsError(SparsecError):
    """Inconsistent replica settings (exit 2, like a usage error)."""

    exit_code = 2


class RayUnavailable(SparsecError):
    """Ray Serve is not installed here (exit 3, like an unavailable backend)."""

    exit_code = 3


@dataclass(frozen=True)
class ReplicaOptions:
    replicas: int = 1  # fixed replica count, or the initial count when autoscaling
    min_replicas: int | None = None  # either bound given: Serve's autoscaler runs between them
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 64  # per replica; room for the dynamic batcher to fill batches
    target_ongoing_requests: float = 16.0  # autoscaling: ongoing requests per replica Serve aims at
    address: str | None = None  # None: start a local Ray instance

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ReplicaOptionsError(f"--replicas must be >= 1, got {self.replicas}")
        if not self.cpus_per_replica > 0:
            raise ReplicaOptionsError(f"--cpus-per-replica must be > 0, got {self.cpus_per_replica}")
        if self.autoscaling:
            low, high = self.bounds
            if low < 0 or high < 1 or low > high:
                raise ReplicaOptionsError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got {low}..{high}")
            if not low <= self.replicas <= high:
                raise ReplicaOptionsError(f"--replicas {self.replicas} (the initial count) must lie within "
                                          f"--min-replicas {low} and --max-replicas {high}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def bounds(self) -> tuple[int, int]:
        low = self.min_replicas if self.min_replicas is not None else min(1, self.max_replicas or 1)
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return low, high

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment` (Ray Serve's documented names)."""
        opts: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                                "ray_actor_options": {"num_cpus": self.cpus_per_replica}}
        if self.autoscaling:
            low, high = self.bounds
            opts["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": self.replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas
        return opts


def replica_config(config: ServeConfig, options: ReplicaOptions) -> ServeConfig:
    """The config each replica runs: one process, and (unless --threads says otherwise) as many
    inference threads as the CPUs Ray reserves for it — not all of the machine's cores each."""
    if config.workers != 1:
        raise ReplicaOptionsError("--workers and --replicas exclude each other: Ray Serve runs the replicas (use --replicas)")
    return dataclasses.replace(config, threads=config.threads or max(1, math.floor(options.cpus_per_replica)))


class ReplicaApp:
    """ASGI wrapper of one replica's app: tags responses with the replica id and holds the lifespan's
    start-up until the model is warm (or reports the load failure)."""

    def __init__(self, app: Any, replica_id: str):
        self.app = app
        self.tag = replica_id.encode()

    def add_exception_handler(self, *args: Any, **kwargs: Any) -> None:
        """Ray Serve registers its back-pressure handlers on the app it is given."""
        self.app.add_exception_handler(*args, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._hold_startup(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.tag)]}
            await send(message)

        await self.app(scope, receive, tagged)

    def _hold_startup(self, send: Callable) -> Callable:
        state = self.app.state.sparsec

        async def wrapped(message):
            if message["type"] == "lifespan.startup.complete":
                loop = asyncio.get_running_loop()
                deadline = loop.time() + READY_TIMEOUT_S
                while not state.ready and state.load_error is None and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                if not state.ready:
                    message = {"type": "lifespan.startup.failed",
                               "message": state.load_error or f"model not ready after {READY_TIMEOUT_S:.0f}s"}
            await send(message)

        return wrapped


class SparsecReplica:
    """Ray Serve deployment body (wrapped by `serve.ingress()` in `build_application`)."""

    def __init__(self, config_json: str):
        self.config = ServeConfig.from_env(config_json)

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        from runtimes.serve.app import create_app
        from runtimes.serve.model import open_artifact

        target = open_artifact(self.config.artifact, self.config.backend, self.config.plugins)
        replica_id = serve.get_replica_context().replica_id.unique_id
        logging.getLogger("sparsec.server").info("replica %s (pid %d) serving %s", replica_id, os.getpid(), self.config.artifact)
        return ReplicaApp(create_app(self.config, target), replica_id)


def build_application(config: ServeConfig, options: ReplicaOptions) -> Any:
    """The Serve application (a bound deployment) for `config`."""
    from ray import serve

    deployment = serve.deployment(name="sparsec", **options.deployment_options())(serve.ingress()(SparsecReplica))
    return deployment.bind(replica_config(config, options).to_env())


def import_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise RayUnavailable("--replicas needs Ray Serve: pip install 'sparsec[ray]' (ray[serve])") from None


def start_ray(options: ReplicaOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if options.address:
            ray.init(address=options.address, **common)
            return
        cpus = os.cpu_count() or 1
        needed = options.replicas * options.cpus_per_replica
        if needed > cpus:
            raise ReplicaOptionsError(f"{options.replicas} replicas x {options.cpus_per_replica:g} CPUs need {needed:g} CPUs; "
                                      f"this machine has {cpus}: lower --replicas or --cpus-per-replica, or give --ray-address")
        ray.init(num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SparsecError(f"cannot start Ray ({options.address or 'a local instance'}): {' '.join(str(exc).split())[:300]}") from None


def serve_on_ray(config: ServeConfig, options: ReplicaOptions, echo: Callable[[str], None] = print) -> None:
    """Deploy on Ray Serve and block until SIGTERM/SIGINT; then remove the deployment and leave Ray."""
    import_ray()
    from ray import serve

    app = build_application(config, options)  # checks the options before Ray starts
    start_ray(options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        low, high = options.bounds if options.autoscaling else (options.replicas, options.replicas)
        scaling = f"{options.replicas} replicas" + (f" (autoscaling {low}..{high})" if options.autoscaling else "")
        echo(f"ready: {scaling} on Ray Serve at http://{config.host}:{config.port}")
        while not stop.wait(0.5):
            pass
        echo("stopping: removing the Ray Serve application")
    except RuntimeError as exc:
        raise SparsecError(f"Ray Serve deployment failed: {' '.join(str(exc).split())[:400]}") from None
    finally:
        shutdown(config.graceful_timeout_s + 10)


def shutdown(timeout_s: float) -> None:
    """Remove the Serve application (replicas finish their requests), bounded in time: a Ctrl-C or a
    process-group SIGTERM also reaches a local Ray's own processes, and Serve's shutdown would then wait
    for a dead raylet. Ray is left (a local instance is stopped) either way."""
    import ray
    from ray import serve

    worker = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    ray.shutdown()
