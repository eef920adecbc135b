"""Serving any batched model: the Task interface, and what every task shares (admission,
decode threads, one batcher per task, warm-up, readiness, metrics, jobs). Knows nothing
of HTTP (that is api/) and of any particular model (classification/ is one task)."""

from serving.engine import Engine, open_job_store
from serving.errors import InferenceFailed, ModelNotFound, NotReady
from serving.task import (
    InputError,
    LoadContext,
    NoOptions,
    Payload,
    ServingOverrides,
    Task,
    TaskSettings,
)

__all__ = [
    "Engine",
    "InferenceFailed",
    "InputError",
    "LoadContext",
    "ModelNotFound",
    "NoOptions",
    "NotReady",
    "Payload",
    "ServingOverrides",
    "Task",
    "TaskSettings",
    "open_job_store",
]
