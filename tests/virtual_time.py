"""An asyncio event loop whose clock the test drives, for the batcher's unit tests.

``loop.time()`` starts at 0 and moves only in two ways:

- ``await advance(seconds)``: the test moves it, and every timer that falls due on the
  way fires at its own time, in order;
- by itself, to the next timer, when nothing else can happen: no callback is ready, no
  I/O is waiting, and no batch is computing in an executor the code under test owns.
  Waiting for that timer would change nothing but the wall clock.

So a batch delay or a deadline passes when the test says, or at once when the batcher
would only be waiting for it, never because the machine was slow. Work in the default
executor (``asyncio.to_thread``, the test's own waits on threads) does not hold the
clock; a batch function running in the batcher's own executor does, so that its compute
time is whatever the test advances while it holds the batch.
"""

import asyncio
import selectors
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

# Zero-length yields that let every chain of callbacks the code under test starts run
# to its end (the batcher's longest is a few steps).
SETTLE_YIELDS = 20


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls without blocking when the loop would only be waiting for its next timer, and
    moves the loop's clock to that timer instead."""

    loop: "VirtualTimeLoop"

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is None or timeout <= 0 or self.loop.computing:
            return super().select(timeout)  # type: ignore[no-any-return]
        events = super().select(0)
        if not events:
            self.loop.now += timeout
        return events  # type: ignore[no-any-return]


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _Selector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0
        self.computing = 0  # calls running in an executor the code under test passed

    def time(self) -> float:
        return self.now

    def run_in_executor(
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> "asyncio.Future[T]":
        future = super().run_in_executor(executor, func, *args)
        if executor is not None:
            self.computing += 1
            future.add_done_callback(self._computed)
        return future

    def _computed(self, _: "asyncio.Future[Any]") -> None:
        self.computing -= 1

    def next_timer(self) -> float | None:
        return min(
            (handle.when() for handle in self._scheduled if not handle.cancelled()), default=None
        )


async def settle() -> None:
    """Lets what is ready run, and what that makes ready, without moving the clock."""
    for _ in range(SETTLE_YIELDS):
        await asyncio.sleep(0)


async def advance(seconds: float) -> None:
    """Moves the clock ``seconds`` on, firing each timer due on the way at its own time."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop), "run this test on VirtualTimeLoop"
    target = loop.now + seconds
    await settle()
    while (when := loop.next_timer()) is not None and when <= target:
        loop.now = max(loop.now, when)
        await settle()
    loop.now = target
    await settle()
