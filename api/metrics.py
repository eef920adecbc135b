"""HTTP metrics, and the exposition of every metric (the batchers' are in
serving/metrics.py). With several gunicorn workers, PROMETHEUS_MULTIPROC_DIR makes
prometheus-client aggregate every worker's numbers in /metrics."""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from serving.metrics import LATENCY_BUCKETS

REQUESTS = Counter(
    "http_requests_total", "HTTP requests by route and status.", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency, body read to response sent.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
GRPC_REQUESTS = Counter(
    "grpc_requests_total",
    "gRPC calls by method and status code (each request of a stream counts once).",
    ["method", "code"],
)
GRPC_SECONDS = Histogram(
    "grpc_request_duration_seconds",
    "gRPC call latency, message received to answer ready.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
