"""A model-agnostic asyncio micro-batcher.

Callers ``submit`` one item each and await its own result. A single loop task groups
queued items into batches and hands each batch to the batch function, which runs in a
worker thread of its own (one per batch computed at once) so the event loop keeps serving
while batches compute.

Every time the batcher reads or waits for (deadlines, batch delays, queue waits, compute
times) is on one clock, its event loop's: a test drives it by running the batcher on a
loop whose clock it controls (tests/virtual_time.py).
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from batching.errors import (
    BatcherClosed,
    BatcherError,
    BatchSizeMismatch,
    DeadlineExceeded,
)
from batching.estimate import WaitEstimate
from batching.observer import BatcherObserver
from batching.queues import Pending, PriorityQueues, set_exception
from batching.stats import BatcherStats, Events

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

BatchFn = Callable[[list[In]], Sequence[Out | BaseException]]
"""Takes a batch of inputs and returns one result, or one exception, per input, in order."""


def _set_result(future: "asyncio.Future[Out]", result: Out) -> None:
    if not future.done():
        future.set_result(result)


class MicroBatcher(Generic[In, Out]):
    """Groups concurrent submissions into batches for one batch function.

    A batch closes when it holds ``max_batch_size`` items, or ``max_batch_delay_s`` after
    its first item arrived, whichever comes first. Up to ``concurrency`` batches compute at
    once; while all of them are busy, the next one keeps filling up to ``max_batch_size``:
    it could not start earlier anyway.

    Lower priorities (higher numbers) fill what higher ones leave, but while any of their
    items wait they get at least ``min_share`` of the items computed, so that they always
    progress even when urgent items alone would saturate the model. Which items go into a
    batch is ``PriorityQueues``' policy (batching/queues.py); what happens is counted once,
    in ``Events`` (batching/stats.py).
    """

    def __init__(
        self,
        batch_fn: BatchFn[In, Out],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_size: int,
        name: str = "batcher",
        observer: BatcherObserver | None = None,
        priorities: int = 1,
        shed_late: bool = True,
        min_share: float = 0.0,
        concurrency: int = 1,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``concurrency`` batches may compute at once, each in its own thread: for a
        batch function that runs faster as several single-threaded calls than as one
        multi-threaded call. ``on_crash`` is called if the batch loop itself dies (a bug):
        the batcher then serves nothing more, and its owner should stop the process."""
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if max_batch_delay_s < 0:
            raise ValueError(f"max_batch_delay_s must be >= 0, got {max_batch_delay_s!r}")
        if not isinstance(max_queue_size, int) or max_queue_size < 1:
            raise ValueError(f"max_queue_size must be an integer >= 1, got {max_queue_size!r}")
        if not isinstance(priorities, int) or priorities < 1:
            raise ValueError(f"priorities must be an integer >= 1, got {priorities!r}")
        if not 0 <= min_share < 1:
            raise ValueError(f"min_share must be >= 0 and < 1, got {min_share!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.name = name
        self.events = Events(observer)
        self.queues: PriorityQueues[In, Out] = PriorityQueues(
            name, priorities, max_queue_size, min_share, self.events
        )
        self._wakeup: asyncio.Future[None] | None = None
        self._accepting = False
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.concurrency = concurrency
        # The batches computing now, by the future of their batch function's call.
        self._running: dict[asyncio.Future[Sequence[Out | BaseException]], list[Pending[In, Out]]]
        self._running = {}
        self._forming: list[Pending[In, Out]] = []
        self.estimate = WaitEstimate(name, self.events, enabled=shed_late, concurrency=concurrency)
        self._last_batch_size = 0
        self.on_crash = on_crash

    @property
    def stats(self) -> BatcherStats:
        """What happened since the start, for /metadata."""
        return self.events.stats

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return self.queues.depth

    def expect_seconds_per_item(self, seconds: float) -> None:
        """Starts the estimate behind ``expected_wait`` from a measurement made before the
        first batch, such as a warm-up's, so that admission works from the first request.
        It counts batches of ``max_batch_size`` at that pace."""
        self.estimate.expect(seconds, self.max_batch_size)

    def start(self) -> None:
        """Starts the batch loop on the running event loop."""
        if self._loop_task is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._executor = ThreadPoolExecutor(
            self.concurrency, thread_name_prefix=f"{self.name}-worker"
        )
        self._accepting = True
        self._loop_task = asyncio.create_task(self._run(), name=f"{self.name}-loop")
        self._loop_task.add_done_callback(self._on_loop_done)

    async def submit(
        self,
        item: In,
        *,
        deadline: float | None = None,
        priority: int = 0,
        admitted: bool = False,
    ) -> Out:
        """Queues ``item`` and returns its result.

        Items of a lower ``priority`` number always go into batches first; higher numbers
        fill the capacity left over, so they progress whenever no lower one is waiting.

        ``deadline`` is an absolute time on the event loop's clock (``loop.time()``).
        Raises ``QueueFull`` or ``BatcherClosed`` at once when the item cannot be queued,
        ``DeadlineExceeded`` when the deadline passes first, and whatever the batch
        function returned or raised for this item.

        An ``admitted`` item passed ``admit`` before the caller prepared it, counted
        there among the items coming, so it is not refused as late a second time: that
        would throw away the preparation. It still fails if its deadline passes.
        """
        self.events.submitted()
        if not self._accepting:
            self.events.rejected("closed")
            raise BatcherClosed(f"{self.name} is not accepting work")
        loop = asyncio.get_running_loop()
        self.queues.check_room(priority, loop.time())
        if not admitted:
            self.admit(deadline, priority)
        future: asyncio.Future[Out] = loop.create_future()
        self.queues.add(Pending(item, future, deadline, loop.time(), priority))
        self._wake()
        if deadline is None:
            return await future
        try:
            async with asyncio.timeout_at(deadline):
                return await future
        except TimeoutError:
            raise DeadlineExceeded(f"no result from {self.name} before the deadline") from None

    def admit(
        self,
        deadline: float | None,
        priority: int = 0,
        *,
        coming: int = 0,
        ready_in: float = 0.0,
    ) -> None:
        """Raises QueueFull if an item due at ``deadline`` would not be answered in time
        (see ``expected_wait``). ``submit`` checks this; a caller can check it earlier,
        before costly preparation of the item, counting as ``coming`` the items it has
        already let through that will be submitted ahead of this one, and ``ready_in``
        the seconds until this one will be prepared."""
        now = asyncio.get_running_loop().time()
        self.estimate.check(deadline, self._ahead(priority) + coming, now, ready_in)

    def expected_wait(
        self, priority: int = 0, *, coming: int = 0, ready_in: float = 0.0
    ) -> float | None:
        """Seconds until a new item of ``priority`` would have its result, estimated from
        recent batches, with ``coming`` more items queued ahead of it and ready for the
        model in ``ready_in`` seconds; None before the first batch."""
        return self.estimate.expected_wait(self._ahead(priority) + coming, ready_in)

    def _ahead(self, priority: int) -> int:
        running = sum(len(batch) for batch in self._running.values())
        return self.queues.up_to(priority) + len(self._forming) + running

    async def stop(self, drain_timeout: float) -> None:
        """Stops accepting items, lets queued and running ones finish for up to
        ``drain_timeout`` seconds, then fails whatever is left with ``BatcherClosed``."""
        self._accepting = False
        self._wake()
        task = self._loop_task
        if task is not None and not task.done():
            done, _ = await asyncio.wait([task], timeout=drain_timeout)
            if not done:
                logger.warning(
                    "%s: drain did not finish in %.1fs; failing %d queued and %d running items",
                    self.name,
                    drain_timeout,
                    self.queue_depth,
                    sum(len(batch) for batch in self._running.values()),
                )
                task.cancel()
                await asyncio.wait([task])
        self._fail_everything(BatcherClosed(f"{self.name} stopped before this item was computed"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _sleep(self, busy: bool, wait_s: float | None) -> None:
        """Sleeps until an item is added, a running batch finishes (if ``busy``) or
        ``wait_s`` passes."""
        self._wakeup = asyncio.get_running_loop().create_future()
        waiters: list[asyncio.Future[Any]] = [self._wakeup]
        if busy:
            waiters.extend(self._running)
        try:
            await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wakeup.cancel()
            self._wakeup = None

    def _workers_busy(self) -> bool:
        """Whether every worker thread is computing a batch."""
        return len(self._running) >= self.concurrency

    async def _collect(self) -> list[Pending[In, Out]] | None:
        """Returns the next batch once it may start, or None when stopped and drained."""
        loop = asyncio.get_running_loop()
        batch: list[Pending[In, Out]] = []
        self._forming = batch
        self.queues.shed_hopeless(batch, self.estimate, loop.time())
        while not batch:
            self.queues.fill(batch, self.max_batch_size, loop.time())
            if not batch:
                if not self._accepting:
                    return None
                await self._sleep(busy=False, wait_s=None)
        # At low load batching must cost nothing: when a worker is free and the last batch
        # held one item, nobody else is likely to come, so the batch goes at once.
        delay = (
            0.0
            if self._last_batch_size == 1 and not self._workers_busy()
            else self.max_batch_delay_s
        )
        closes_at = loop.time() + delay
        while len(batch) < self.max_batch_size:
            self.queues.fill(batch, self.max_batch_size, loop.time())
            if len(batch) >= self.max_batch_size:
                break
            busy = self._workers_busy()
            remaining = closes_at - loop.time()
            if not busy and (remaining <= 0 or not self._accepting):
                break
            await self._sleep(busy, wait_s=remaining if remaining > 0 else None)
        while self._workers_busy():
            await asyncio.wait(list(self._running), return_when=asyncio.FIRST_COMPLETED)
        self.queues.shed_hopeless(batch, self.estimate, loop.time())
        self.queues.make_room_for_urgent(batch, loop.time())
        return batch

    async def _run(self) -> None:
        while (batch := await self._collect()) is not None:
            now = asyncio.get_running_loop().time()
            batch = [p for p in batch if not self.queues.is_dead(p, now)]
            if batch:
                self._dispatch(batch)
            self._forming = []
        if self._running:
            await asyncio.wait(list(self._running))

    def _dispatch(self, batch: list[Pending[In, Out]]) -> None:
        self.events.batch_started(len(batch))
        self._last_batch_size = len(batch)
        self.queues.dispatched(batch)
        loop = asyncio.get_running_loop()
        started = loop.time()
        queue_waits = [started - p.submitted_at for p in batch]
        inputs = [p.item for p in batch]
        running = loop.run_in_executor(self._executor, self.batch_fn, inputs)
        self._running[running] = batch

        def finished(done: "asyncio.Future[Sequence[Out | BaseException]]") -> None:
            seconds = loop.time() - started
            if self._resolve(batch, done):
                # A batch that failed as a whole may have failed fast: its time says
                # nothing about the model's pace.
                self.estimate.batch_done(seconds, len(batch))
            self.events.batch_done(queue_waits, seconds)

        running.add_done_callback(finished)

    def _resolve(
        self, batch: list[Pending[In, Out]], done: "asyncio.Future[Sequence[Out | BaseException]]"
    ) -> bool:
        """Settles each item's future; False when the batch failed as a whole."""
        self._running.pop(done, None)
        if done.cancelled():
            for pending in batch:
                set_exception(pending.future, BatcherClosed(f"{self.name} stopped mid-batch"))
            return False
        error = done.exception()
        if error is None:
            results = done.result()
            if len(results) != len(batch):
                error = BatchSizeMismatch(
                    f"batch function returned {len(results)} results for {len(batch)} inputs"
                )
        if error is not None:
            logger.error("%s: batch of %d failed", self.name, len(batch), exc_info=error)
            self.events.failed(len(batch))
            for pending in batch:
                set_exception(pending.future, error)
            return False
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self.events.failed(1)
                set_exception(pending.future, result)
            else:
                _set_result(pending.future, result)
        return True

    def _fail_everything(self, error: BatcherError) -> None:
        running = [pending for batch in self._running.values() for pending in batch]
        for future in self._running:
            future.cancel()
        for pending in [*running, *self._forming, *self.queues.drain()]:
            set_exception(pending.future, error)
        self._running.clear()
        self._forming = []

    def _on_loop_done(self, task: "asyncio.Task[None]") -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.error("%s: batch loop crashed", self.name, exc_info=error)
            self._accepting = False
            self._fail_everything(BatcherClosed(f"{self.name} loop crashed: {error!r}"))
            if self.on_crash is not None:
                self.on_crash(error)
