"""Computes job items taken from a store, a bounded number at a time."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from redis.backoff import ExponentialBackoff

from jobs.models import ItemResult, WorkItem
from jobs.store import JobStore, StoreUnavailable

logger = logging.getLogger(__name__)

ProcessItem = Callable[[WorkItem, bytes], Awaitable[ItemResult]]
"""Computes a work item from its data (never None here)."""
DescribeError = Callable[[BaseException], dict[str, Any]]

TAKE_WAIT_S = 1.0
TAKE_BACKOFF = ExponentialBackoff(cap=5.0, base=0.05)
"""Waits between failed takes: 0.1, 0.2, ... 5 s."""


class HandBack(Exception):
    """Raised by ``process_item`` when this process cannot compute the item now (it is
    stopping): the item goes back to the store for another replica, not into the job's
    results as an error."""


class JobRunner:
    """Takes items from ``store`` while fewer than ``concurrency`` are in flight here, so
    a big job never floods the batcher, and records each result. Any number of runners,
    in any number of processes, can share one store.

    On shutdown it takes nothing more, lets the items in flight finish, and hands back
    the rest; it never cancels a job.
    """

    def __init__(
        self,
        store: JobStore,
        process_item: ProcessItem,
        describe_error: DescribeError,
        *,
        concurrency: int,
        max_deliveries: int,
        keep_alive_s: float,
    ) -> None:
        self.store = store
        self.process_item = process_item
        self.describe_error = describe_error
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.keep_alive_s = keep_alive_s
        self._in_flight: dict[str, tuple[WorkItem, asyncio.Task[None]]] = {}
        self._dropping: set[str] = set()
        self._handing_back: list[WorkItem] = []
        self._slot_freed = asyncio.Event()
        self._taking = False
        self._tasks: list[asyncio.Task[None]] = []
        store.on_cancel(self._drop_job)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def start(self) -> None:
        self._taking = True
        for name, loop in (("job-consumer", self._consume), ("job-keep-alive", self._keep_alive)):
            task = asyncio.create_task(loop(), name=name)
            task.add_done_callback(_log_crash)
            self._tasks.append(task)

    def stop_taking(self) -> None:
        """Takes no new items from now on."""
        self._taking = False
        self._slot_freed.set()

    async def stop(self, grace_s: float) -> None:
        """Stops taking items, waits up to ``grace_s`` for those in flight, and hands
        back whatever is left for another replica."""
        self.stop_taking()
        consumer, keeper = self._tasks or (None, None)
        if consumer is not None:
            # The consumer returns within one take; what it took then is handed back.
            done, _ = await asyncio.wait([consumer], timeout=TAKE_WAIT_S + 3)
            if not done:
                consumer.cancel()
        working = [task for _, task in self._in_flight.values()]
        if working:
            _, late = await asyncio.wait(working, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.wait(working)
        if keeper is not None:
            keeper.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._handing_back:
            try:
                await self.store.release(self._handing_back)
                logger.info("handed back %d job items for another replica", len(self._handing_back))
            except StoreUnavailable as exc:
                logger.warning("could not hand back job items (%s); they will be reclaimed", exc)

    async def _consume(self) -> None:
        failures = 0
        while self._taking:
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                items = await self.store.take(free, TAKE_WAIT_S)
            except StoreUnavailable as exc:
                failures += 1
                delay = TAKE_BACKOFF.compute(failures)
                logger.warning("cannot take job items (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if not self._taking:
                self._handing_back += items
                return
            for item in items:
                task = asyncio.create_task(self._work(item), name=f"job-item-{item.handle}")
                self._in_flight[item.handle] = (item, task)
                task.add_done_callback(partial(self._finished, item.handle))

    def _finished(self, handle: str, _task: "asyncio.Task[None]") -> None:
        self._in_flight.pop(handle, None)
        self._dropping.discard(handle)
        self._slot_freed.set()

    async def _work(self, item: WorkItem) -> None:
        try:
            if item.delivery > self.max_deliveries:
                detail = (
                    f"no replica finished this image in {item.delivery - 1} tries: it may"
                    " crash the server (JOB_MAX_DELIVERIES)"
                )
                await self.store.record(
                    item, {"error": {"status": 500, "detail": detail}}, ok=False
                )
                return
            if item.data is None or not await self.store.begin(item):
                await self.store.discard(item)
                return
            try:
                result = await self.process_item(item, item.data)
            except asyncio.CancelledError:
                raise
            except HandBack:
                self._handing_back.append(item)
            except Exception as exc:
                await self.store.record(item, {"error": self.describe_error(exc)}, ok=False)
            else:
                await self.store.record(item, result, ok=True)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if item.handle in self._dropping:
                await self._quietly(self.store.discard(item))
            else:
                self._handing_back.append(item)
        except StoreUnavailable as exc:
            # The item stays pending in the store and is taken again after the claim time.
            logger.warning("could not record job %s item %d: %s", item.job_id, item.index, exc)

    async def _keep_alive(self) -> None:
        """Keeps this replica's claim on the items it works on, however long they wait
        behind interactive requests, and drops items of jobs cancelled meanwhile (in case
        the cancellation notice was missed)."""
        while True:
            await asyncio.sleep(self.keep_alive_s)
            items = [item for item, _ in self._in_flight.values()]
            try:
                ended = await self.store.keep_alive(items)
            except StoreUnavailable as exc:
                logger.warning("cannot refresh job items (%s)", exc)
                continue
            for job_id in ended:
                self._drop_job(job_id)

    def _drop_job(self, job_id: str) -> None:
        for handle, (item, task) in list(self._in_flight.items()):
            if item.job_id == job_id and not task.done():
                self._dropping.add(handle)
                task.cancel()

    @staticmethod
    async def _quietly(work: Awaitable[None]) -> None:
        try:
            await work
        except StoreUnavailable as exc:
            logger.warning("could not acknowledge a dropped job item: %s", exc)


def _log_crash(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("%s crashed", task.get_name(), exc_info=error)
