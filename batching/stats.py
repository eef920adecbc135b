"""Counters the batcher keeps for /metadata."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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

    def record_batch(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.batch_sizes[size] += 1

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
