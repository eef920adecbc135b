"""Admission: whether an item can still be answered before its deadline, judged from the
pace of recent batches."""

import math

from batching.errors import QueueFull
from batching.observer import BatcherObserver
from batching.stats import BatcherStats, RunningMean

# At admission the estimate gets a margin: it is an average and the deadline a hard limit.
ADMISSION_MARGIN = 1.2


class Admission:
    """Keeps the seconds-per-item estimate and refuses, as late, what it cannot serve in
    time. Under overload the model then spends its time on items that can still make
    their deadline instead of on ones that cannot."""

    def __init__(
        self, name: str, stats: BatcherStats, observer: BatcherObserver, *, enabled: bool
    ) -> None:
        self.name = name
        self.stats = stats
        self.observer = observer
        self.enabled = enabled
        self._seconds_per_item = RunningMean()
        self._seconds_per_batch = RunningMean()
        self._last_per_item: float | None = None
        self._last_batch: float | None = None

    @property
    def seconds_per_item(self) -> float | None:
        """The recent mean, or the last batch's pace when that was slower: a slowdown
        (a busier host) counts from its first batch, a speed-up only as it lasts."""
        return _slower(self._seconds_per_item.value, self._last_per_item)

    @property
    def seconds_per_batch(self) -> float | None:
        """How long one batch takes, the same way: the recent mean or the last if slower."""
        return _slower(self._seconds_per_batch.value, self._last_batch)

    def expect(self, seconds_per_item: float, batch_size: int) -> None:
        """Seeds the estimate from a measurement made before the first batch: batches of
        ``batch_size`` at ``seconds_per_item``."""
        if self._seconds_per_item.value is None:
            self._seconds_per_item.add(seconds_per_item)
            self._seconds_per_batch.add(seconds_per_item * batch_size)

    def batch_done(self, seconds: float, size: int) -> None:
        self._last_per_item, self._last_batch = seconds / size, seconds
        self._seconds_per_item.add(self._last_per_item)
        self._seconds_per_batch.add(seconds)

    def expected_wait(self, ahead: int) -> float | None:
        """Seconds until an item with ``ahead`` items before it has its result: their
        work at the recent pace, then its own batch's, which a lone item waits out in full.
        None before anything was measured."""
        per_item, per_batch = self.seconds_per_item, self.seconds_per_batch
        if per_item is None or per_batch is None:
            return None
        return ahead * per_item + per_batch

    def check(self, deadline: float | None, ahead: int, now: float) -> None:
        """Raises QueueFull if an item due at ``deadline`` would not be answered in time."""
        wait = self.expected_wait(ahead)
        if deadline is None or wait is None or not self.enabled:
            return
        if now + ADMISSION_MARGIN * wait > deadline:
            raise self.late(wait)

    def hopeless(self, deadline: float | None, ahead: int, now: float) -> float | None:
        """The expected wait of a queued item that surely cannot meet ``deadline`` any
        more (no margin: only the surely late), else None."""
        wait = self.expected_wait(ahead)
        if deadline is None or wait is None or not self.enabled or now + wait <= deadline:
            return None
        return wait

    def late(self, wait: float) -> QueueFull:
        """Counts a refusal as late; its Retry-After is when the backlog should be gone."""
        self.stats.rejected_late += 1
        self.observer.rejected("would_expire")
        return QueueFull(
            f"{self.name} is about {wait:.2f} s behind, past this deadline",
            retry_after=max(1, math.ceil(wait)),
        )


def _slower(mean: float | None, last: float | None) -> float | None:
    return mean if mean is None or last is None else max(mean, last)
