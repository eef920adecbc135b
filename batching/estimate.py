"""The wait estimate: whether an item can still be answered before its deadline, judged
from the pace of recent batches."""

import math

from batching.errors import TooLate
from batching.stats import Events, RunningMean

# A wait is a sum of batch times. Each varies by about ``spread`` (their mean absolute
# deviation); k batches ahead vary by about spread * sqrt(k), and admission leaves
# SPREADS_OF_MARGIN times that. A flat margin on the whole wait (a 20% one refused a
# closed loop whose every answer came well within its deadline) grows with the wait,
# while the variation of a long wait shrinks beside it.
SPREADS_OF_MARGIN = 2.0
# Before the first batch, the spread is assumed to be this share of a batch's time.
SEEDED_SPREAD = 0.1


class WaitEstimate:
    """Keeps the estimate of the batches' pace and refuses, as late, what it cannot
    serve in time. Under overload the model then spends its time on items that can
    still make their deadline instead of on ones that cannot."""

    def __init__(
        self,
        name: str,
        events: Events,
        *,
        enabled: bool,
        concurrency: int = 1,
    ) -> None:
        """``concurrency`` batches compute at once, each at the pace measured."""
        self.name = name
        self.concurrency = concurrency
        self.events = events
        self.enabled = enabled
        self._seconds_per_item = RunningMean()
        self._seconds_per_batch = RunningMean()
        self._spread = RunningMean()  # of a batch's time around the mean

    @property
    def seconds_per_item(self) -> float | None:
        """The recent mean time per item, in one of the batches computing at once."""
        return self._seconds_per_item.value

    @property
    def seconds_per_batch(self) -> float | None:
        """The recent mean time of one batch."""
        return self._seconds_per_batch.value

    def expect(self, seconds_per_item: float, batch_size: int) -> None:
        """Seeds the estimate from a measurement made before the first batch: batches of
        ``batch_size`` at ``seconds_per_item``."""
        if self._seconds_per_item.value is None:
            self._seconds_per_item.add(seconds_per_item)
            self._seconds_per_batch.add(seconds_per_item * batch_size)
            self._spread.add(SEEDED_SPREAD * seconds_per_item * batch_size)

    def batch_done(self, seconds: float, size: int) -> None:
        if (mean := self._seconds_per_batch.value) is not None:
            self._spread.add(abs(seconds - mean))
        self._seconds_per_item.add(seconds / size)
        self._seconds_per_batch.add(seconds)

    def _work_ahead(self, ahead: int) -> float | None:
        """Seconds the model needs for ``ahead`` items at the recent pace, shared by the
        batches computing at once; None before anything was measured."""
        per_item = self.seconds_per_item
        return None if per_item is None else ahead * per_item / self.concurrency

    def expected_wait(self, ahead: int, ready_in: float = 0.0) -> float | None:
        """Seconds until an item with ``ahead`` items before it has its result, if it is
        ready for the model in ``ready_in`` seconds: the model computes the items ahead
        meanwhile, then the item's own batch, which a lone item waits out in full. None
        before anything was measured."""
        work, per_batch = self._work_ahead(ahead), self.seconds_per_batch
        if work is None or per_batch is None:
            return None
        return max(ready_in, work) + per_batch

    def margin(self, ahead: int) -> float:
        """How far a wait with ``ahead`` items before it may plausibly run over its
        estimate (see SPREADS_OF_MARGIN)."""
        work, per_batch = self._work_ahead(ahead), self.seconds_per_batch
        spread = self._spread.value
        if work is None or per_batch is None or spread is None or per_batch <= 0:
            return 0.0
        batches = work / per_batch  # in a row, per worker
        return SPREADS_OF_MARGIN * spread * math.sqrt(batches + 1)

    def check(self, deadline: float | None, ahead: int, now: float, ready_in: float = 0.0) -> None:
        """Raises QueueFull if an item due at ``deadline`` would not be answered in time."""
        wait = self.expected_wait(ahead, ready_in)
        if deadline is None or wait is None or not self.enabled:
            return
        if now + wait + self.margin(ahead) > deadline:
            raise self.late(wait)

    def hopeless(self, deadline: float | None, ahead: int, now: float) -> float | None:
        """The expected wait of a queued item that surely cannot meet ``deadline`` any
        more (no margin: only the surely late), else None."""
        wait = self.expected_wait(ahead)
        if deadline is None or wait is None or not self.enabled or now + wait <= deadline:
            return None
        return wait

    def late(self, wait: float) -> TooLate:
        """Counts a refusal as late; its Retry-After is when the backlog should be gone."""
        self.events.rejected("would_expire")
        return TooLate(
            f"{self.name} is about {wait:.2f} s behind, past this deadline",
            retry_after=max(1, math.ceil(wait)),
        )
