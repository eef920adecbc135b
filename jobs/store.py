"""The contract every job store keeps, and what the stores share.

A store holds jobs (status, results, events) for the API side, and hands their items out
as work for the runner side. ``MemoryJobStore`` serves one process; ``RedisJobStore``
serves every worker and replica that points at the same Redis.
"""

import asyncio
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from jobs.models import ItemResult, JobEvent, JobStatus, WorkItem


class StoreFull(Exception):
    """No room for another job now. ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(Exception):
    """The store cannot be reached or did not answer in time."""


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` already names a job of this task with other content."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"this Idempotency-Key was already used for job {job_id}, whose items differ from"
            " this request's"
        )


def content_digest(items: Sequence[bytes | ItemResult]) -> str:
    """What a job's items hold, to tell a retried submission from a different one."""
    digest = hashlib.sha256()
    for item in items:
        part = item if isinstance(item, bytes) else json.dumps(item, sort_keys=True).encode()
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


def kept_bytes(result: ItemResult) -> int:
    """About what a finished item's result costs a store: the result, and its progress
    event that repeats it."""
    return 2 * len(json.dumps(result)) + 100


# What a finished job costs a store besides its results: its record and final event.
JOB_KEPT_BYTES = 500


def scoped_key(task: str, idempotency_key: str) -> str:
    """An ``Idempotency-Key`` names a job within one task's routes."""
    return f"{task}\0{idempotency_key}"


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """What all replicas together may hold: live jobs, their images still queued, and
    about how many bytes finished jobs keep (the oldest go first beyond it)."""

    max_jobs: int
    max_items: int
    max_bytes: int
    max_finished_bytes: int = 256 * 1024 * 1024

    def check(self, live: int, items: int, nbytes: int, new_items: int, new_bytes: int) -> None:
        """Raises StoreFull if a job of ``new_items`` images, ``new_bytes`` in all, does
        not fit beside ``live`` jobs with ``items`` images of ``nbytes`` queued."""
        if live >= self.max_jobs:
            raise StoreFull(f"{live} jobs are queued or running (MAX_JOBS)")
        if items + new_items > self.max_items:
            raise StoreFull(
                f"{items} images are queued and this job has {new_items}; at most"
                f" {self.max_items} may be (MAX_QUEUED_JOB_ITEMS)"
            )
        if nbytes + new_bytes > self.max_bytes:
            raise StoreFull(
                f"{nbytes} bytes of images are queued and this job brings {new_bytes}; at"
                f" most {self.max_bytes} may be (MAX_QUEUED_JOB_BYTES)"
            )


class Reading:
    """The new jobs whose bodies this process is reading. Each counts as a live job of
    its declared size until it is created or refused, so that uploads read at the same
    time cannot each pass admission and then all hold their bodies. ``create`` checks
    the limits again, for good, with what was read."""

    def __init__(self) -> None:
        self.jobs = 0
        self.nbytes = 0

    @contextmanager
    def hold(
        self, limits: StoreLimits, live: int, items: int, queued: int, nbytes: int
    ) -> Iterator[None]:
        """Holds room for a body of ``nbytes`` beside ``live`` jobs with ``items`` images
        of ``queued`` bytes, and the bodies already being read; raises StoreFull on entry
        if there is none."""
        limits.check(live + self.jobs, items, queued + self.nbytes, 0, nbytes)
        self.jobs += 1
        self.nbytes += nbytes
        try:
            yield
        finally:
            self.jobs -= 1
            self.nbytes -= nbytes


class ChangeFeed:
    """Wakes whoever watches a job when that job changes in any process.

    Take a watch *before* reading the state it guards, then await it: a change between
    the read and the wait is not missed.
    """

    def __init__(self) -> None:
        self._watches: dict[str, set[asyncio.Future[None]]] = {}
        self.closed = False

    def watch(self, job_id: str) -> "asyncio.Future[None]":
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(None)
        else:
            self._watches.setdefault(job_id, set()).add(future)
        return future

    async def wait(self, watch: "asyncio.Future[None]", seconds: float) -> bool:
        """True if the watched job changed (or the feed closed) within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                await asyncio.shield(watch)
            return True
        except TimeoutError:
            return False

    def notify(self, job_id: str) -> None:
        for future in self._watches.pop(job_id, ()):
            if not future.done():
                future.set_result(None)

    def notify_all(self) -> None:
        """Wakes every watcher, to read again what it may have missed."""
        for job_id in list(self._watches):
            self.notify(job_id)

    def close(self) -> None:
        """Wakes every watcher, now and later: the server is stopping."""
        self.closed = True
        self.notify_all()

    def forget(self, job_id: str, watch: "asyncio.Future[None]") -> None:
        """Ends a watch; every ``watch`` must be forgotten, changed or not."""
        watch.cancel()
        watches = self._watches.get(job_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[job_id]

    def __len__(self) -> int:
        return sum(len(watches) for watches in self._watches.values())


class JobStore(Protocol):
    """The API side creates, reads and cancels jobs; the runner side takes their items,
    computes them and records the results. Every method may raise StoreUnavailable."""

    feed: ChangeFeed

    async def start(self) -> None:
        """Connects and prepares what the store needs; never fails for a store that is
        down (the store is then retried lazily)."""
        ...

    async def close(self) -> None: ...

    def admit(self, nbytes: int) -> AbstractAsyncContextManager[None]:
        """Holds room for a new job of about ``nbytes`` while its body is read and the
        job created (``async with``); raises StoreFull on entry if there is none now."""
        ...

    async def create(
        self,
        items: Sequence[bytes | ItemResult],
        idempotency_key: str | None = None,
        task: str = "",
        digest: str = "",
    ) -> tuple[dict[str, Any], bool]:
        """Stores a job of ``items`` for ``task`` (inputs, or the error result of an item
        that could not be read) and queues its inputs. Returns its summary ``{"job_id",
        "status", "total"}`` and whether it was created: False when ``idempotency_key``
        names a job of ``task`` already submitted with the same ``digest`` (see
        content_digest). Raises StoreFull, or IdempotencyConflict when the digests
        differ."""
        ...

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's status, progress and results, or None if unknown or expired."""
        ...

    async def events(self, job_id: str, after: int) -> list[JobEvent] | None:
        """The job's events with an id above ``after``, or None if unknown or expired."""
        ...

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Ends a live job as cancelled; returns the job's status afterwards, or None if
        unknown. Every replica stops working on it."""
        ...

    async def remove(self, job_id: str) -> JobStatus | None:
        """Cancels the job if it is live, then deletes it with its results and events;
        returns its status just before (``cancelled`` for a job that was live), or None
        if unknown."""
        ...

    async def take(self, count: int, wait_s: float) -> list[WorkItem]:
        """Up to ``count`` items to compute, waiting up to ``wait_s`` for the first."""
        ...

    async def begin(self, item: WorkItem) -> bool:
        """Marks the item's job running; False if the job ended and the item must be
        discarded instead of computed."""
        ...

    async def record(self, item: WorkItem, result: ItemResult, *, ok: bool) -> None:
        """Stores the item's result once (a redelivered item is not counted twice),
        emits its progress event, ends the job after its last item, and acknowledges
        the delivery."""
        ...

    async def discard(self, item: WorkItem) -> None:
        """Acknowledges a delivery without a result: its job has ended."""
        ...

    async def release(self, items: Sequence[WorkItem]) -> None:
        """Hands items back undone, for any replica to take at once."""
        ...

    async def keep_alive(self, items: Sequence[WorkItem]) -> list[str]:
        """Tells the store these items are still being worked on; returns the ids of
        the jobs among theirs that have ended."""
        ...

    def on_cancel(self, callback: "CancelCallback") -> None:
        """Calls ``callback(job_id)`` in this process when any process cancels a job."""
        ...


class CancelCallback(Protocol):
    def __call__(self, job_id: str) -> None: ...
