"""Prometheus metrics of every task's batcher, labelled by task and version (a repository
model serves several versions at once, each with its own batcher)."""

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from batching import BatcherObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

QUEUE_DEPTH = Gauge(
    "batcher_queue_depth",
    "Items waiting for the model.",
    ["task", "version"],
    multiprocess_mode="livesum",
)
BATCH_SIZE = Histogram(
    "batcher_batch_size",
    "Items per computed batch.",
    ["task", "version"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128),
)
QUEUE_WAIT_SECONDS = Histogram(
    "batcher_queue_wait_seconds",
    "Time from submission to the start of the item's batch.",
    ["task", "version"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "batcher_inference_seconds",
    "Wall time of one batch's forward pass.",
    ["task", "version"],
    buckets=LATENCY_BUCKETS,
)
DROPPED = Counter(
    "batcher_items_dropped_total",
    "Items dropped before compute, by reason.",
    ["reason", "task", "version"],
)
REJECTED = Counter(
    "batcher_items_rejected_total", "Submissions refused, by reason.", ["reason", "task", "version"]
)


class PrometheusObserver(BatcherObserver):
    """Exports the batcher of one version of a task. Every reason is exported from the
    start, as 0, so that rate() and alerts see the series."""

    def __init__(self, task: str, version: str) -> None:
        self.task = task
        self._depth = QUEUE_DEPTH.labels(task, version)
        self._batch_size = BATCH_SIZE.labels(task, version)
        self._queue_wait = QUEUE_WAIT_SECONDS.labels(task, version)
        self._inference = INFERENCE_SECONDS.labels(task, version)
        self._dropped = {
            reason: DROPPED.labels(reason, task, version) for reason in ("expired", "cancelled")
        }
        self._rejected = {
            reason: REJECTED.labels(reason, task, version)
            for reason in ("queue_full", "would_expire", "closed")
        }

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_done(self, queue_waits: Sequence[float], compute_seconds: float) -> None:
        self._batch_size.observe(len(queue_waits))
        self._inference.observe(compute_seconds)
        for wait in queue_waits:
            self._queue_wait.observe(wait)

    def dropped(self, reason: str) -> None:
        self._dropped[reason].inc()

    def rejected(self, reason: str) -> None:
        self._rejected[reason].inc()
