"""Where jobs live. In memory for now; the protocol is what a Redis store would implement."""

import time
from collections.abc import Callable
from typing import Protocol

from jobs.models import Job


class StoreFull(Exception):
    """The store already holds MAX_JOBS jobs."""


class JobStore(Protocol):
    def add(self, job: Job) -> None:
        """Stores a new job, or raises StoreFull."""
        ...

    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown or expired."""
        ...

    def __len__(self) -> int: ...


class InMemoryJobStore:
    """Holds up to ``max_jobs`` jobs; a finished job expires ``ttl_s`` after it finished.

    Jobs are lost when the process restarts.
    """

    def __init__(
        self, max_jobs: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._clock = clock
        self._jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self._expire()
        if len(self._jobs) >= self.max_jobs:
            raise StoreFull(f"the server already holds {self.max_jobs} jobs (MAX_JOBS)")
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        self._expire()
        return self._jobs.get(job_id)

    def __len__(self) -> int:
        self._expire()
        return len(self._jobs)

    def _expire(self) -> None:
        now = self._clock()
        expired = [
            job_id
            for job_id, job in self._jobs.items()
            if job.finished_monotonic is not None and now - job.finished_monotonic >= self.ttl_s
        ]
        for job_id in expired:
            del self._jobs[job_id]
