"""A generic asyncio micro-batcher. It knows nothing about the model it feeds."""

from batching.batcher import BatchFn, MicroBatcher
from batching.errors import (
    BatcherClosed,
    BatcherError,
    BatchSizeMismatch,
    DeadlineExceeded,
    QueueFull,
    TooLate,
)
from batching.observer import BatcherObserver
from batching.stats import BatcherStats, RunningMean

__all__ = [
    "BatchFn",
    "BatchSizeMismatch",
    "BatcherClosed",
    "BatcherError",
    "BatcherObserver",
    "BatcherStats",
    "DeadlineExceeded",
    "MicroBatcher",
    "QueueFull",
    "RunningMean",
    "TooLate",
]
