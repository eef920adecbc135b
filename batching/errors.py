"""Errors raised to callers of the micro-batcher."""


class BatcherError(Exception):
    """Base class for every error the batcher raises to a caller."""


class QueueFull(BatcherError):
    """The queue already holds ``max_queue_size`` items; try again later."""


class BatcherClosed(BatcherError):
    """The batcher is not accepting work: it has not started, or it is stopping."""


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before its result was ready."""


class BatchSizeMismatch(BatcherError):
    """The batch function returned a different number of results than it was given."""
