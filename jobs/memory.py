"""Jobs in this process's memory: for one worker, lost on restart."""

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from jobs.models import (
    FINAL_EVENT,
    LIVE_STATUSES,
    ItemResult,
    JobEvent,
    JobStatus,
    WorkItem,
    completion_status,
    now_iso,
)
from jobs.store import (
    JOB_KEPT_BYTES,
    CancelCallback,
    ChangeFeed,
    IdempotencyConflict,
    Reading,
    StoreLimits,
    kept_bytes,
    scoped_key,
)


@dataclass(eq=False)
class _Job:
    total: int
    task: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: float | None = None
    done: int = 0
    failed: int = 0
    idempotency_key: str | None = None
    digest: str = ""
    kept: int = JOB_KEPT_BYTES
    results: list[ItemResult | None] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    def progress(self) -> dict[str, int]:
        return {"done": self.done, "failed": self.failed, "total": self.total}

    def summary(self) -> dict[str, Any]:
        return {"job_id": self.id, "status": self.status.value, "total": self.total}

    def snapshot(self) -> dict[str, Any]:
        return {
            "job_id": self.id,
            "task": self.task,
            "status": self.status.value,
            "progress": self.progress(),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "results": list(self.results),
        }

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append(JobEvent(len(self.events) + 1, kind, data))


class MemoryJobStore:
    """Holds live jobs within ``limits``; a finished job stays readable for ``ttl_s``,
    or until finished jobs keep more than ``limits.max_finished_bytes``."""

    def __init__(
        self,
        *,
        limits: StoreLimits,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.ttl_s = ttl_s
        self.feed = ChangeFeed()
        self.reading = Reading()
        self._clock = clock
        self._jobs: dict[str, _Job] = {}
        self._by_key: dict[str, str] = {}
        # Finished jobs, oldest first: they expire in this order.
        self._finished: OrderedDict[str, _Job] = OrderedDict()
        self.finished_bytes = 0
        self._work: deque[WorkItem] = deque()
        self._data: dict[str, dict[int, bytes]] = {}
        self._work_added: asyncio.Event | None = None
        self._cancel_callbacks: list[CancelCallback] = []
        self.live_jobs = 0
        self.queued_items = 0
        self.queued_bytes = 0

    async def start(self) -> None:
        self._work_added = asyncio.Event()

    async def close(self) -> None:
        self.feed.close()

    @asynccontextmanager
    async def admit(self, nbytes: int) -> AsyncIterator[None]:
        counts = (self.live_jobs, self.queued_items, self.queued_bytes)
        with self.reading.hold(self.limits, *counts, nbytes):
            yield

    def _check_room(self, items: int, nbytes: int) -> None:
        self.limits.check(self.live_jobs, self.queued_items, self.queued_bytes, items, nbytes)

    async def create(
        self,
        items: Sequence[bytes | ItemResult],
        idempotency_key: str | None = None,
        task: str = "",
        digest: str = "",
    ) -> tuple[dict[str, Any], bool]:
        self._expire()
        key = None if idempotency_key is None else scoped_key(task, idempotency_key)
        if key is not None and (known := self._by_key.get(key)):
            if self._jobs[known].digest != digest:
                raise IdempotencyConflict(known)
            return self._jobs[known].summary(), False
        images = [(i, item) for i, item in enumerate(items) if isinstance(item, bytes)]
        nbytes = sum(len(data) for _, data in images)
        self._check_room(len(images), nbytes)
        job = _Job(total=len(items), task=task, idempotency_key=key, digest=digest)
        job.results = [None] * job.total
        summary = job.summary()
        self._jobs[job.id] = job
        if key is not None:
            self._by_key[key] = job.id
        self.live_jobs += 1
        self.queued_items += len(images)
        self.queued_bytes += nbytes
        self._data[job.id] = dict(images)
        for index, _ in images:
            self._work.append(WorkItem(job.id, index, None, 1, f"{job.id}:{index}", task))
        for index, item in enumerate(items):
            if not isinstance(item, bytes):
                self._record(job, index, item, ok=False)
        if images:
            self._signal_work()
        return summary, True

    async def get(self, job_id: str) -> dict[str, Any] | None:
        job = self._job(job_id)
        return job.snapshot() if job else None

    async def events(self, job_id: str, after: int) -> list[JobEvent] | None:
        job = self._job(job_id)
        return job.events[max(after, 0) :] if job else None

    async def cancel(self, job_id: str) -> JobStatus | None:
        job = self._job(job_id)
        if job is None:
            return None
        if job.live:
            self._finish(job, JobStatus.CANCELLED)
            for callback in self._cancel_callbacks:
                callback(job_id)
        return job.status

    async def remove(self, job_id: str) -> JobStatus | None:
        job = self._job(job_id)
        if job is None:
            return None
        await self.cancel(job_id)
        self._forget(job)
        self.feed.notify(job_id)
        return job.status

    async def take(self, count: int, wait_s: float) -> list[WorkItem]:
        assert self._work_added is not None, "start() the store first"
        if not self._work:
            self._work_added.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await self._work_added.wait()
            except TimeoutError:
                return []
        taken: list[WorkItem] = []
        while self._work and len(taken) < count:
            item = self._work.popleft()
            taken.append(replace(item, data=self._data.get(item.job_id, {}).get(item.index)))
        return taken

    async def begin(self, item: WorkItem) -> bool:
        job = self._jobs.get(item.job_id)
        if job is None or not job.live:
            return False
        if job.status is JobStatus.QUEUED:
            job.status = JobStatus.RUNNING
            job.started_at = now_iso()
            self.feed.notify(job.id)
        return True

    async def record(self, item: WorkItem, result: ItemResult, *, ok: bool) -> None:
        job = self._jobs.get(item.job_id)
        if job is not None and job.live:
            self._record(job, item.index, result, ok=ok)

    async def discard(self, item: WorkItem) -> None:
        pass

    async def release(self, items: Sequence[WorkItem]) -> None:
        for item in reversed(items):
            self._work.appendleft(replace(item, data=None))
        if items:
            self._signal_work()

    async def keep_alive(self, items: Sequence[WorkItem]) -> list[str]:
        ended = {item.job_id for item in items}
        return [job_id for job_id in ended if not self._jobs.get(job_id, _ENDED).live]

    def on_cancel(self, callback: CancelCallback) -> None:
        self._cancel_callbacks.append(callback)

    def _record(self, job: _Job, index: int, result: ItemResult, *, ok: bool) -> None:
        if job.results[index] is not None:
            return
        job.results[index] = result
        job.kept += kept_bytes(result)
        job.done += 1
        job.failed += 0 if ok else 1
        data = self._data.get(job.id, {}).pop(index, None)
        if data is not None:
            self._unqueue(1, len(data))
        job.emit("progress", {"index": index, **job.progress(), "result": result})
        if job.done == job.total:
            self._finish(job, completion_status(job.failed, job.total))
        self.feed.notify(job.id)

    def _finish(self, job: _Job, status: JobStatus) -> None:
        job.status = status
        job.finished_at = now_iso()
        job.expires_at = self._clock() + self.ttl_s
        self._finished[job.id] = job
        self.finished_bytes += job.kept
        self.live_jobs -= 1
        left = self._data.pop(job.id, {})
        self._unqueue(len(left), sum(len(data) for data in left.values()))
        job.emit(FINAL_EVENT[status], {"status": status.value, **job.progress()})
        self.feed.notify(job.id)
        self._expire()

    def _unqueue(self, items: int, nbytes: int) -> None:
        self.queued_items -= items
        self.queued_bytes -= nbytes

    def _signal_work(self) -> None:
        if self._work_added is not None:
            self._work_added.set()

    def _job(self, job_id: str) -> _Job | None:
        self._expire()
        return self._jobs.get(job_id)

    def _expire(self) -> None:
        """Forgets finished jobs past their time, and the oldest beyond the budget."""
        now = self._clock()
        while self._finished:
            job = next(iter(self._finished.values()))
            assert job.expires_at is not None
            over = self.finished_bytes > self.limits.max_finished_bytes and len(self._finished) > 1
            if now < job.expires_at and not over:
                break
            self._forget(job)

    def _forget(self, job: _Job) -> None:
        """Deletes every trace of a finished job."""
        del self._finished[job.id]
        del self._jobs[job.id]
        self.finished_bytes -= job.kept
        if job.idempotency_key is not None:
            self._by_key.pop(job.idempotency_key, None)


_ENDED = _Job(total=0, status=JobStatus.CANCELLED)
