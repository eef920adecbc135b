"""Prometheus metrics. With several gunicorn workers, PROMETHEUS_MULTIPROC_DIR makes
prometheus-client aggregate every worker's numbers in /metrics."""

import os
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from batching import BatcherObserver

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

REQUESTS = Counter(
    "http_requests_total", "HTTP requests by route and status.", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency, body read to response sent.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "batcher_queue_depth", "Items waiting for the model.", multiprocess_mode="livesum"
)
BATCH_SIZE = Histogram(
    "batcher_batch_size",
    "Items per computed batch.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128),
)
QUEUE_WAIT_SECONDS = Histogram(
    "batcher_queue_wait_seconds",
    "Time from submission to the start of the item's batch.",
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "batcher_inference_seconds", "Wall time of one batch's forward pass.", buckets=_LATENCY_BUCKETS
)
DROPPED = Counter(
    "batcher_items_dropped_total", "Items dropped before compute, by reason.", ["reason"]
)
REJECTED = Counter("batcher_items_rejected_total", "Submissions refused, by reason.", ["reason"])
# Every reason is exported from the start, as 0, so rate() and alerts see the series.
for _reason in ("expired", "cancelled"):
    DROPPED.labels(_reason)
for _reason in ("queue_full", "would_expire", "closed"):
    REJECTED.labels(_reason)


class PrometheusObserver(BatcherObserver):
    def queue_depth(self, depth: int) -> None:
        QUEUE_DEPTH.set(depth)

    def batch_done(self, queue_waits: Sequence[float], compute_seconds: float) -> None:
        BATCH_SIZE.observe(len(queue_waits))
        INFERENCE_SECONDS.observe(compute_seconds)
        for wait in queue_waits:
            QUEUE_WAIT_SECONDS.observe(wait)

    def dropped(self, reason: str) -> None:
        DROPPED.labels(reason).inc()

    def rejected(self, reason: str) -> None:
        REJECTED.labels(reason).inc()


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
