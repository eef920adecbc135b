"""The interface a task implements to be served: one class in one module.

A task turns a request into an item (``decode``, in a decode thread), computes items in
batches (``predict_batch``, in the model thread) and turns each result into JSON
(``encode``, on the event loop). The server does the rest for every task alike:
admission and load shedding, batching, the 503/504 contract, jobs, metrics, readiness.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel
from pydantic_settings import BaseSettings

from serving.warmup import tune_batch_size
from settings import FROM_ENVIRONMENT, read_settings

if TYPE_CHECKING:
    import numpy as np

    from serving.tensors import Row, TensorForm

Item = TypeVar("Item")
Result = TypeVar("Result")

Payload = bytes | Any
"""What ``decode`` receives: a multipart ``file`` part as bytes, or a JSON body (a job's
JSON item) as the parsed value."""


class InputError(Exception):
    """Raised by ``decode`` (or for one item by ``predict_batch``) when an input cannot be
    used: only that request fails, with ``status`` and this message as its ``detail``."""

    status = 400
    advice = ""  # appended to the message: what the caller should do

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


@dataclass(frozen=True)
class LoadContext:
    """What ``load`` may use: where to compute, with how many threads, and where to keep
    files it derives (exports, caches)."""

    device: str
    threads: int
    cache_dir: Path


@dataclass(frozen=True)
class ServingOverrides:
    """A task's own limits where they differ from the server's settings (None: the
    setting's): the largest batch (a cap on MAX_BATCH_SIZE, or on what ``auto`` tries),
    MAX_BATCH_DELAY_MS, TIMEOUT and MAX_QUEUE_SIZE."""

    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    timeout: float | None = None
    max_queue_size: int | None = None


class NoOptions(BaseModel):
    """The options of a task that takes none."""


class TaskSettings(BaseSettings):
    """Subclass this for a task's own settings: each field is an environment variable of
    the same name (case-insensitive), read and validated when the server starts."""

    model_config = FROM_ENVIRONMENT


class NoSettings(TaskSettings):
    """The settings of a task that has none of its own."""


class Task(Generic[Item, Result]):
    """Subclass this, set ``name`` and implement the four methods.

    Optional: ``Settings``, a ``TaskSettings`` subclass of the task's own environment
    variables (read at startup, a bad value stops it, ``self.settings`` in the task);
    ``Options``, a pydantic model of the request's query parameters (validated, 422 on
    a bad value, passed to ``decode`` and ``encode``); ``Response``, the pydantic model
    of ``encode``'s answer, and ``json_schema``, the JSON Schema of one JSON input, for
    the OpenAPI schema; ``jobs_field``, the JSON key that holds a job's items;
    ``check_item``, ``light_model``, ``example``, ``warm_up`` and ``describe``; for the
    Open Inference Protocol (V2), ``tensor_form`` with ``tensor_outputs`` and, unless the
    task takes one BYTES input as its payload, ``tensor_payload`` (serving/tensors.py).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"  # over the Open Inference Protocol
    Settings: ClassVar[type[TaskSettings]] = NoSettings
    Options: ClassVar[type[BaseModel]] = NoOptions
    Response: ClassVar[type[BaseModel] | None] = None
    jobs_field: ClassVar[str] = "inputs"
    json_schema: ClassVar[dict[str, Any] | None] = None

    @cached_property
    def settings(self) -> Any:
        """This task's ``Settings``, read from the environment on first use. The server
        reads them before it starts, so that a bad value stops it with a message naming
        the variable; annotate to get their type (``settings: MySettings = self.settings``)."""
        return read_settings(self.Settings, f"task {self.name!r}")

    def load(self, context: LoadContext) -> None:
        """Loads the model. Runs once at startup, in a thread; raise ValueError with a
        message naming the setting to fix when it cannot."""
        raise NotImplementedError

    def decode(self, payload: Payload, options: Any) -> Item:
        """Turns one request's payload into an item for the model. Runs in a decode
        thread; raise InputError for an unusable input."""
        raise NotImplementedError

    def check_item(self, value: Any) -> None:
        """Raises InputError if a JSON job item can never be an input (the wrong type,
        a field missing), so that a job's submission answers it at once rather than
        queueing it. Runs off the event loop, once per item: keep it cheap, leave the
        decoding to ``decode``."""

    def predict_batch(self, items: list[Item]) -> list[Result | Exception]:
        """Computes a batch: one result, or one exception, per item, in order. Runs in
        the task's model thread."""
        raise NotImplementedError

    def encode(self, result: Result, options: Any) -> Any:
        """Turns one result into the JSON-able answer. Runs on the event loop: keep it
        cheap."""
        raise NotImplementedError

    def concurrency(self) -> int:
        """How many batches ``predict_batch`` may compute at once, each in a model thread
        of its own. Called after ``load``. 1 unless the model runs faster as several
        single-threaded calls side by side."""
        return 1

    def light_model(self) -> bool:
        """Whether the model takes only a small share of a request's CPU time (int8 on the
        CPU, say), so that decoding may have every core rather than half of them, as
        beside a model on a GPU. Called after ``load``; False unless overridden."""
        return False

    def example(self) -> Item | None:
        """An item for warm-up and batch-size tuning; None skips both."""
        return None

    def warm_up(self, max_batch_size: int, tune: bool) -> dict[str, Any]:
        """Runs every batch shape the batcher forms, on ``example()``, before the server
        turns ready; with ``tune`` times them and reports the ``batch_size`` to use. The
        report's ``seconds_per_item`` starts load shedding before the first batch, and an
        optional ``decode_seconds_per_item`` counts the decode threads' backlog in it
        before the first decode. Override for a warm-up of your own (the image tasks time
        their backend)."""
        example = self.example()
        if example is None:
            return {}
        return tune_batch_size(
            lambda n: self.predict_batch([example] * n),
            max_batch_size,
            tune=tune,
            concurrency=self.concurrency(),
        )

    def describe(self) -> dict[str, Any]:
        """What /metadata shows about the task and its model."""
        return {}

    def serving_overrides(self) -> ServingOverrides:
        """Limits of this task's own, called after ``load``: none by default."""
        return ServingOverrides()

    def model_config(self) -> dict[str, Any] | None:
        """The task's model as a Triton ModelConfig (JSON), for /v2/models/{name}/config;
        None: derived from its tensor form and batcher."""
        return None

    def tensor_form(self) -> "TensorForm | None":
        """The task's inputs and outputs over the Open Inference Protocol, or None: it is
        then listed in /v2 as unavailable. Called once, after ``load``."""
        return None

    def tensor_payload(self, row: "Row") -> Payload:
        """One row of a V2 request as ``decode``'s payload. By default the one element of
        the task's one BYTES input, as a multipart file carries it. Runs on the event
        loop: keep it cheap."""
        from serving.tensors import only_bytes

        if len(row) != 1:
            raise NotImplementedError(f"{type(self).__name__}: implement tensor_payload")
        (name,) = row
        return only_bytes(row, name)

    def tensor_options(self, parameters: Mapping[str, Any]) -> Any:
        """The options of a V2 request, from its parameters: those named like a field of
        ``Options`` (``top_k``, say) are validated as a query parameter would be."""
        fields = self.Options.model_fields
        return self.Options.model_validate({k: v for k, v in parameters.items() if k in fields})

    def tensor_outputs(self, results: list[Result], options: Any) -> "dict[str, np.ndarray]":
        """The results of a V2 request's rows as its output tensors, each with the rows as
        its first dimension. Runs on the event loop."""
        raise NotImplementedError

    def classification(self, result: Result, count: int) -> list[str]:
        """The ``count`` best classes of a result as Triton's classification extension
        writes them, ``"score:index:label"``; for a task that classifies."""
        raise InputError(f"model {self.name!r} does not classify: ask for its outputs as they are")


_REQUIRED = ("load", "decode", "predict_batch", "encode")


def check_task(task_class: Any, spec: str) -> None:
    """Raises ValueError naming TASKS when ``task_class`` does not implement the interface."""
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        raise ValueError(f"TASKS entry {spec!r} is not a subclass of serving.Task")
    name = getattr(task_class, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or not name.islower():
        raise ValueError(
            f"TASKS entry {spec!r}: name must be a lowercase identifier (its route), got {name!r}"
        )
    missing = [m for m in _REQUIRED if getattr(task_class, m) is getattr(Task, m)]
    if missing:
        raise ValueError(f"TASKS entry {spec!r} does not implement {', '.join(missing)}")
    if not (isinstance(task_class.Options, type) and issubclass(task_class.Options, BaseModel)):
        raise ValueError(f"TASKS entry {spec!r}: Options must be a pydantic model")
    settings = task_class.Settings
    if not (isinstance(settings, type) and issubclass(settings, TaskSettings)):
        raise ValueError(f"TASKS entry {spec!r}: Settings must subclass serving.TaskSettings")
