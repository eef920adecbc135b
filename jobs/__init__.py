"""Asynchronous jobs: many images, one id, results and progress over time."""

from jobs.memory import MemoryJobStore
from jobs.models import ItemResult, JobEvent, JobStatus, WorkItem
from jobs.redis_store import RedisJobStore
from jobs.runner import HandBack, JobRunner
from jobs.store import (
    ChangeFeed,
    IdempotencyConflict,
    JobStore,
    StoreFull,
    StoreLimits,
    StoreUnavailable,
    content_digest,
)

__all__ = [
    "ChangeFeed",
    "HandBack",
    "IdempotencyConflict",
    "ItemResult",
    "JobEvent",
    "JobRunner",
    "JobStatus",
    "JobStore",
    "MemoryJobStore",
    "RedisJobStore",
    "StoreFull",
    "StoreLimits",
    "StoreUnavailable",
    "WorkItem",
    "content_digest",
]
