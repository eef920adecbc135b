"""Errors the runtime raises that only the HTTP layer gives a status code."""


class NotReady(Exception):
    """The model is still loading or warming up, or the server is shutting down."""


class InferenceFailed(Exception):
    """The model raised while computing this request's batch; the batcher logged it."""
