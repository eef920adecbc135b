"""The items waiting for a batch, and the policy that picks them: priority classes, the
minimum share of the lower ones, pre-emption by more urgent items, and shedding of the
items that can no longer meet their deadline. Runs on the event loop only."""

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from batching.errors import DeadlineExceeded, QueueFull
from batching.estimate import WaitEstimate
from batching.stats import Events

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(eq=False, slots=True)
class Pending(Generic[In, Out]):
    item: In
    future: "asyncio.Future[Out]"
    deadline: float | None
    submitted_at: float
    priority: int
    # Taken under the minimum share: no more urgent item displaces it from its batch.
    guaranteed: bool = False


def set_exception(future: "asyncio.Future[Out]", exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class PriorityQueues(Generic[In, Out]):
    """One queue per priority class, 0 first, each of up to ``max_size`` items.

    Lower priorities (higher numbers) fill what higher ones leave, but while any of their
    items wait they get at least ``min_share`` of the items computed."""

    def __init__(
        self, name: str, priorities: int, max_size: int, min_share: float, events: Events
    ) -> None:
        self.name = name
        self.max_size = max_size
        self.min_share = min_share
        self.events = events
        self._queues: list[deque[Pending[In, Out]]] = [deque() for _ in range(priorities)]
        self._since_lower = 0  # items computed since the last one of a priority above 0

    @property
    def depth(self) -> int:
        return sum(len(queue) for queue in self._queues)

    def up_to(self, priority: int) -> int:
        """Items queued at ``priority`` or more urgent: those a new one would wait behind."""
        return sum(len(queue) for queue in self._queues[: priority + 1])

    def check_room(self, priority: int, now: float) -> None:
        """Raises QueueFull when the class ``priority`` holds ``max_size`` live items."""
        queue = self._queues[priority]
        if len(queue) >= self.max_size:
            self._purge_dead(queue, now)
            if len(queue) >= self.max_size:
                self.events.rejected("queue_full")
                raise QueueFull(f"{self.name} queue is full ({self.max_size} items)")

    def add(self, pending: Pending[In, Out]) -> None:
        self._queues[pending.priority].append(pending)
        self.events.queue_depth(self.depth)

    def fill(self, batch: list[Pending[In, Out]], size: int, now: float) -> None:
        """Adds live items to ``batch`` up to ``size``, most urgent first, one of a lower
        class first when its minimum share is due."""
        if self._lower_priority_due(batch, size):
            self._take_one_guaranteed(batch, now)
        for queue in self._queues:
            while queue and len(batch) < size:
                pending = queue.popleft()
                if not self.is_dead(pending, now):
                    batch.append(pending)
        self.events.queue_depth(self.depth)

    def dispatched(self, batch: list[Pending[In, Out]]) -> None:
        """Counts a batch that starts computing towards the minimum share."""
        if any(pending.priority > 0 for pending in batch):
            self._since_lower = 0
        else:
            self._since_lower += len(batch)

    def is_dead(self, pending: Pending[In, Out], now: float) -> bool:
        """Whether ``pending`` must not be computed (counted and reported if so)."""
        if pending.deadline is not None and now >= pending.deadline:
            self.events.dropped("expired")
            set_exception(pending.future, DeadlineExceeded("deadline passed while queued"))
            return True
        if pending.future.done():
            self.events.dropped("cancelled")
            return True
        return False

    def shed_hopeless(
        self, batch: list[Pending[In, Out]], estimate: WaitEstimate, now: float
    ) -> None:
        """Refuses, as late, the queued items that the present pace can no longer compute
        before their deadline: each would otherwise wait to time out. WaitEstimate judged
        them on an older estimate; this keeps its promise when the model slows down (a
        busier host, a cold cache) instead of answering them with a timeout. ``batch``,
        about to run, is counted as done, so only the surely late are refused."""
        ahead = len(batch)
        for queue in self._queues:
            live: list[Pending[In, Out]] = []
            for pending in queue:
                wait = None
                if not pending.future.done():  # a done one is dropped as cancelled
                    wait = estimate.hopeless(pending.deadline, ahead, now)
                if wait is None:
                    ahead += 1
                    live.append(pending)
                else:
                    set_exception(pending.future, estimate.late(wait))
            if len(live) != len(queue):
                queue.clear()
                queue.extend(live)
                self.events.queue_depth(self.depth)

    def make_room_for_urgent(self, batch: list[Pending[In, Out]], now: float) -> None:
        """Swaps the batch's least urgent items back to the front of their queues for
        more urgent items that arrived while it waited for a worker."""
        batch.sort(key=lambda pending: pending.priority)
        for priority, queue in enumerate(self._queues):
            while queue and batch and batch[-1].priority > priority and not batch[-1].guaranteed:
                candidate = queue.popleft()
                if self.is_dead(candidate, now):
                    continue
                displaced = batch.pop()
                self._queues[displaced.priority].appendleft(displaced)
                batch.insert(_first_of_priority_above(batch, priority), candidate)
        self.events.queue_depth(self.depth)

    def drain(self) -> list[Pending[In, Out]]:
        """Empties every queue; returns what they held."""
        drained = [pending for queue in self._queues for pending in queue]
        for queue in self._queues:
            queue.clear()
        return drained

    def _lower_priority_due(self, batch: list[Pending[In, Out]], size: int) -> bool:
        return (
            self.min_share > 0
            and self._since_lower * self.min_share >= 1
            and len(batch) < size
            and all(pending.priority == 0 for pending in batch)
        )

    def _take_one_guaranteed(self, batch: list[Pending[In, Out]], now: float) -> None:
        for queue in self._queues[1:]:
            while queue:
                pending = queue.popleft()
                if not self.is_dead(pending, now):
                    pending.guaranteed = True
                    batch.append(pending)
                    return

    def _purge_dead(self, queue: "deque[Pending[In, Out]]", now: float) -> None:
        live = [p for p in queue if not self.is_dead(p, now)]
        queue.clear()
        queue.extend(live)
        self.events.queue_depth(self.depth)


def _first_of_priority_above(batch: list[Pending[In, Out]], priority: int) -> int:
    return next((i for i, p in enumerate(batch) if p.priority > priority), len(batch))
