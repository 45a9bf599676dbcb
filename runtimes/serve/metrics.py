"""Prometheus metrics of one server process, in a registry of its own (no global state).

With `--workers N` every worker process exposes its own metrics (label `worker` = pid); scrape
each worker or sum in Prometheus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from runtimes.serve.batching import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServerMetrics:
    worker: str = field(default_factory=lambda: str(os.getpid()))

    def __post_init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        common = {"registry": self.registry}
        self.requests = Counter("sparsec_requests", "HTTP requests by route and status code",
                                ["worker", "route", "status"], **common)
        self.latency = Histogram("sparsec_request_latency_seconds", "HTTP request latency (until the response is sent)",
                                 ["worker", "route"], buckets=LATENCY_BUCKETS, **common)
        self.in_progress = Gauge("sparsec_requests_in_progress", "HTTP requests being handled", ["worker"], **common)
        self.queue_depth = Gauge("sparsec_queue_depth", "Items waiting in the batching queue", ["worker"], **common)
        self.batch_size = Histogram("sparsec_batch_size", "Items per backend call", ["worker", "kind"],
                                    buckets=BATCH_BUCKETS, **common)
        self.batch_latency = Histogram("sparsec_batch_latency_seconds", "Backend time per batch", ["worker", "kind"],
                                       buckets=LATENCY_BUCKETS, **common)
        self.tokens = Counter("sparsec_tokens", "Tokens processed", ["worker", "kind"], **common)
        self.rejected = Counter("sparsec_rejected", "Requests refused before inference", ["worker", "reason"], **common)
        self.ready = Gauge("sparsec_model_ready", "1 once the model is loaded and warmed up", ["worker"], **common)
        self.ready.labels(self.worker).set(0)
        self.in_progress.labels(self.worker).set(0)
        self.queue_depth.labels(self.worker).set(0)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(self.worker, route, str(status)).inc()
        self.latency.labels(self.worker, route).observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.labels(self.worker, stats.key).observe(stats.size)
        self.batch_latency.labels(self.worker, stats.key).observe(stats.seconds)
        self.queue_depth.labels(self.worker).set(stats.queue_depth)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
