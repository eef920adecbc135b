"""Counters the batcher keeps for /metadata, and the one place that counts them."""

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batching.observer import BatcherObserver


class RunningMean:
    """An exponentially weighted mean: recent samples count most. None until a sample."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        previous = self.value
        self.value = sample if previous is None else previous + self.weight * (sample - previous)


@dataclass
class BatcherStats:
    """Running totals since the batcher started. Mutated only on the event loop."""

    requests: int = 0
    batches: int = 0
    items: int = 0
    failed_items: int = 0
    dropped_expired: int = 0
    dropped_cancelled: int = 0
    rejected_full: int = 0
    rejected_late: int = 0
    rejected_closed: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    # Seconds in all: the items' waits in the queue, the compute counted once per item
    # (as the Open Inference Protocol's statistics count it), and by batch size.
    queue_seconds: float = 0.0
    item_compute_seconds: float = 0.0
    compute_seconds_by_size: defaultdict[int, float] = field(
        default_factory=lambda: defaultdict(float)
    )
    batches_done: int = 0
    items_done: int = 0
    last_done: float | None = None  # time.time() when the last batch ended

    def as_dict(self, queue_depth: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "items": self.items,
            "failed_items": self.failed_items,
            "dropped_expired": self.dropped_expired,
            "dropped_cancelled": self.dropped_cancelled,
            "rejected_full": self.rejected_full,
            "rejected_late": self.rejected_late,
            "rejected_closed": self.rejected_closed,
            "queue_depth": queue_depth,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "batch_size_histogram": {str(size): n for size, n in sorted(self.batch_sizes.items())},
        }


class Events(BatcherObserver):
    """Where the batcher reports what happens, once: each event is counted in ``stats``
    and passed on to the owner's ``observer``."""

    def __init__(self, observer: BatcherObserver | None = None) -> None:
        self.stats = BatcherStats()
        self.observer = observer or BatcherObserver()

    def submitted(self) -> None:
        self.stats.requests += 1

    def rejected(self, reason: str) -> None:
        stats = self.stats
        if reason == "would_expire":  # the one a retry storm repeats
            stats.rejected_late += 1
        elif reason == "queue_full":
            stats.rejected_full += 1
        else:
            stats.rejected_closed += 1
        self.observer.rejected(reason)

    def dropped(self, reason: str) -> None:
        if reason == "expired":
            self.stats.dropped_expired += 1
        else:
            self.stats.dropped_cancelled += 1
        self.observer.dropped(reason)

    def batch_started(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.batch_sizes[size] += 1

    def failed(self, items: int) -> None:
        self.stats.failed_items += items

    def queue_depth(self, depth: int) -> None:
        self.observer.queue_depth(depth)

    def batch_done(self, queue_waits: Sequence[float], compute_seconds: float) -> None:
        stats = self.stats
        stats.batches_done += 1
        stats.items_done += len(queue_waits)
        stats.queue_seconds += sum(queue_waits)
        stats.item_compute_seconds += compute_seconds * len(queue_waits)
        stats.compute_seconds_by_size[len(queue_waits)] += compute_seconds
        stats.last_done = time.time()
        self.observer.batch_done(queue_waits, compute_seconds)
