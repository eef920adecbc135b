"""Errors raised to callers of the micro-batcher."""


class BatcherError(Exception):
    """Base class for every error the batcher raises to a caller."""


class QueueFull(BatcherError):
    """No room for the item now: the queue is full, or the backlog is too long for its
    deadline. ``retry_after`` is a suggested wait in whole seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLate(QueueFull):
    """The backlog ahead is longer than the time left to the item's deadline."""


class BatcherClosed(BatcherError):
    """The batcher is not accepting work: it has not started, or it is stopping."""


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before its result was ready."""


class BatchSizeMismatch(BatcherError):
    """The batch function returned a different number of results than it was given."""
