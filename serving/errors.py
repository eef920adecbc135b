"""Errors the serving layer raises; api/errors.py gives each its HTTP status."""


class NotReady(Exception):
    """The model is still loading or warming up, or the server is shutting down."""


class InferenceFailed(Exception):
    """The model raised while computing this request's batch; the batcher logged it."""
