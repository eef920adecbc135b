"""Hooks through which the batcher reports what it does, e.g. to Prometheus."""

from collections.abc import Sequence


class BatcherObserver:
    """Does nothing; subclass and override what you want to record.

    Every hook is called on the event loop thread and must not block.
    """

    def queue_depth(self, depth: int) -> None:
        """The queue now holds ``depth`` items."""

    def batch_done(self, queue_waits: Sequence[float], compute_seconds: float) -> None:
        """A batch of ``len(queue_waits)`` items finished computing; each item waited
        ``queue_waits[i]`` seconds between submission and the start of its batch."""

    def dropped(self, reason: str) -> None:
        """An item was dropped before compute: ``expired`` or ``cancelled``."""

    def rejected(self, reason: str) -> None:
        """A submission was refused: ``queue_full``, ``would_expire`` or ``closed``."""
