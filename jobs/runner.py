"""Runs each job's items through a caller-supplied coroutine, a bounded number at a time."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from jobs.models import Job, JobStatus
from jobs.store import JobStore

logger = logging.getLogger(__name__)

ProcessItem = Callable[[bytes], Awaitable[dict[str, Any]]]
DescribeError = Callable[[BaseException], dict[str, Any]]


class JobRunner:
    """Owns one task per running job. At most ``concurrency`` items of all jobs together
    are in flight, so a big job never floods the batcher's queue."""

    def __init__(
        self,
        store: JobStore,
        process_item: ProcessItem,
        describe_error: DescribeError,
        concurrency: int,
    ) -> None:
        self.store = store
        self.process_item = process_item
        self.describe_error = describe_error
        self.concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def submit(self, items: list[bytes | BaseException]) -> Job:
        """Stores a new job and starts it. An exception in ``items`` is that item's error.

        Raises StoreFull when the store has no room.
        """
        job = Job(total=len(items))
        self.store.add(job)
        task = asyncio.create_task(self._run(job, items), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda done: self._forget(job, done))
        return job

    def cancel(self, job: Job) -> bool:
        """Cancels ``job``; True if it is (now or already) cancelled, False if it had
        already succeeded or failed. Finished results are kept."""
        if job.finished:
            return job.status is JobStatus.CANCELLED
        job.finish(JobStatus.CANCELLED)
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()
        return True

    async def stop(self) -> None:
        """Cancels every running job and waits for their tasks to end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _run(self, job: Job, items: list[bytes | BaseException]) -> None:
        try:
            await asyncio.gather(*(self._run_item(job, i, items) for i in range(job.total)))
        finally:
            if not job.finished:
                cancelled = asyncio.current_task().cancelling()  # type: ignore[union-attr]
                if cancelled:
                    job.finish(JobStatus.CANCELLED)
                elif job.failed == job.total:
                    job.finish(JobStatus.FAILED)
                else:
                    job.finish(JobStatus.SUCCEEDED)

    async def _run_item(self, job: Job, index: int, items: list[bytes | BaseException]) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        async with self._slots:
            job.start()
            data, items[index] = items[index], b""  # free the upload as soon as it is used
            try:
                if isinstance(data, BaseException):
                    raise data
                result = await self.process_item(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                job.record(index, {"error": self.describe_error(exc)}, ok=False)
            else:
                job.record(index, result, ok=True)

    def _forget(self, job: Job, task: "asyncio.Task[None]") -> None:
        self._tasks.pop(job.id, None)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("job %s crashed", job.id, exc_info=error)
