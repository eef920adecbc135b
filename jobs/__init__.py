"""Asynchronous jobs: many images, one id, results and progress over time."""

from jobs.models import FINAL_STATUSES, Job, JobEvent, JobStatus
from jobs.runner import JobRunner
from jobs.store import InMemoryJobStore, JobStore, StoreFull

__all__ = [
    "FINAL_STATUSES",
    "InMemoryJobStore",
    "Job",
    "JobEvent",
    "JobRunner",
    "JobStatus",
    "JobStore",
    "StoreFull",
]
