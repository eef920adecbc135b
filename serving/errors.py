"""Errors the serving layer raises; api/errors.py gives each its HTTP status."""


class NotReady(Exception):
    """The model is still loading or warming up, or the server is shutting down."""


class InferenceFailed(Exception):
    """The model raised while computing this request's batch; the batcher logged it."""


class ModelNotFound(Exception):
    """No model of that name, no such version of it, or one that failed to load: 404
    (NOT_FOUND over gRPC)."""
