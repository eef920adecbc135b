"""What the protocol means, whatever carries it: inference split into the task's items,
and the server's and each model's metadata, configuration and statistics (as the JSON
that HTTP answers; gRPC parses the same into its messages)."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from batching import DeadlineExceeded, TooLate
from serving import Engine, InputError, NotReady
from serving.service import Duration, TaskService
from serving.tensors import TensorSpec, text_tensor
from v2.tensors import Tensor

SERVER_NAME = "micro-batching-inference-server"
SERVER_VERSION = "0.1.0"
EXTENSIONS = [
    "classification",
    "model_configuration",
    "model_repository",
    "statistics",
    "binary_tensor_data",
]
# Request parameters the protocol itself reads; the others go to the task's options.
TIMEOUT, PRIORITY = "timeout", "priority"
_TRANSPORT_PARAMETERS = {"binary_data_output", "binary_data", "binary_data_size"}
# Triton's priority levels: 0 is the default, 1 the most urgent, larger numbers later.
BACKGROUND_PRIORITY = 2


@dataclass
class Requested:
    """An output the client asked for, with its parameters (``binary_data``,
    ``classification``)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    model: str
    version: str
    id: str
    inputs: list[Tensor]
    outputs: list[Requested]
    parameters: dict[str, Any]


@dataclass
class InferResponse:
    model: str
    id: str
    outputs: list[Tensor]
    version: str


def find(engine: Engine, name: str, version: str = "") -> TaskService:
    """The task serving model ``name`` (at ``version``, "" for the newest)."""
    return engine.service(name, version)


def _why_unavailable(service: TaskService) -> str | None:
    if service.tensor_form is None:
        return (
            f"task {service.name!r} declares no tensor form (serving.Task.tensor_form);"
            f" use POST /{service.name}"
        )
    return None


def model_not_ready(engine: Engine, service: TaskService) -> NotReady | None:
    """Why the model cannot answer now (the process cannot serve, or the model is still
    warming up), or None when it can."""
    if (reason := engine.liveness()) is not None:
        return NotReady(reason)
    try:
        service.require_warm()
    except NotReady as exc:
        return exc
    return None


def server_metadata(engine: Engine) -> dict[str, Any]:
    """``GET /v2``, with each model served and, for one the protocol cannot reach, why."""
    models = []
    for service in engine.services.values():
        reason = _why_unavailable(service)
        models.append({"name": service.name, "available": reason is None, "reason": reason})
    for name, failed in engine.failed.items():
        if name not in engine.services:
            models.append({"name": name, "available": False, "reason": next(iter(failed.values()))})
    return {
        "name": SERVER_NAME,
        "version": SERVER_VERSION,
        "extensions": EXTENSIONS,
        "models": models,
    }


def repository_index(engine: Engine, ready_only: bool = False) -> list[dict[str, str]]:
    """Every model and version, with its state (Triton's repository extension): READY,
    LOADING while it warms up, or UNAVAILABLE with the reason it did not load; and the
    repository's models that are not loaded, with no version."""
    index = []
    for service in engine.all_services():
        state = "READY" if service.warmed_up.is_set() else "LOADING"
        index.append({"name": service.name, "version": service.version, "state": state})
    if not ready_only:
        unavailable = {
            (name, version): reason
            for name, failed in engine.failed.items()
            for version, reason in failed.items()
        }
        if engine.repository is not None:
            unavailable |= {(name, ""): why for name, why in engine.repository.not_loaded().items()}
        for (name, version), reason in unavailable.items():
            index.append(
                {"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason}
            )
    if ready_only:
        index = [entry for entry in index if entry["state"] == "READY"]
    return sorted(index, key=lambda e: (e["name"], len(e["version"]), e["version"]))


class ControlRefused(Exception):
    """A load or unload this server does not take in its MODEL_CONTROL: 400."""


def control(engine: Engine, parameters: Any) -> Any:
    """The repository control that explicit load and unload requests reach."""
    control = engine.repository
    if control is None:
        raise ControlRefused("this server has no MODEL_REPOSITORY to load models from")
    if engine.settings.model_control != "explicit":
        raise ControlRefused(
            f"models are loaded and unloaded on request only with MODEL_CONTROL=explicit"
            f" (this server runs MODEL_CONTROL={engine.settings.model_control})"
        )
    # unload_dependents concerns ensembles, which this server has none of.
    if refused := sorted(set(parameters) - {"unload_dependents", "config"}):
        raise ControlRefused(
            f"load parameter {refused[0]!r} is not supported: files in a request are never"
            " written to MODEL_REPOSITORY; put them there, then load (a 'config' parameter"
            " may replace config.pbtxt for one load)"
        )
    return control


def load_config(parameters: Any) -> str | None:
    """The JSON model configuration a load request gives as its ``config`` parameter, in
    place of config.pbtxt: a string over HTTP, a ModelRepositoryParameter over gRPC."""
    value = parameters.get("config")
    if value is None:
        return None
    if not isinstance(value, str) and value.WhichOneof("parameter_choice") == "string_param":
        value = value.string_param
    if not isinstance(value, str) or not value.strip():
        raise ControlRefused("load parameter 'config' must be a model configuration as JSON")
    return value


def _form(service: TaskService) -> Any:
    if (reason := _why_unavailable(service)) is not None:
        raise InputError(f"model {service.name!r} is not available over this protocol: {reason}")
    return service.tensor_form


def model_metadata(engine: Engine, service: TaskService) -> dict[str, Any]:
    form = _form(service)
    own = service.task.model_config() or {}
    return {
        "name": service.name,
        "versions": sorted(engine.versions[service.name], key=lambda v: (len(v), v)),
        "platform": own.get("platform") or own.get("backend") or "serving_task",
        "inputs": [spec.as_dict() for spec in form.inputs],
        "outputs": [spec.as_dict() for spec in form.outputs],
    }


def _config_tensor(spec: TensorSpec) -> dict[str, Any]:
    datatype = "STRING" if spec.datatype == "BYTES" else spec.datatype
    return {"name": spec.name, "data_type": f"TYPE_{datatype}", "dims": list(spec.shape[1:])}


def model_config(service: TaskService) -> dict[str, Any]:
    """The model as a Triton ModelConfig: one batcher, batches up to its size."""
    form = _form(service)
    size = service.batcher.max_batch_size
    own = service.task.model_config()
    if own is not None:  # a repository model's config.pbtxt, completed
        batching = own.setdefault("dynamic_batching", {})
        batching.setdefault("max_queue_delay_microseconds", _delay_us(service))
        return {**own, "max_batch_size": own.get("max_batch_size") or size}
    return {
        "name": service.name,
        "platform": "",
        "backend": "serving_task",
        "max_batch_size": size,
        "input": [_config_tensor(spec) for spec in form.inputs],
        "output": [_config_tensor(spec) for spec in form.outputs],
        "dynamic_batching": {
            "preferred_batch_size": [size],
            "max_queue_delay_microseconds": _delay_us(service),
        },
    }


def _delay_us(service: TaskService) -> int:
    return round(service.settings.max_batch_delay_ms * 1000)


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * 1e9)}


def _of(duration: Duration) -> dict[str, int]:
    return _duration(duration.count, duration.seconds)


def model_statistics(service: TaskService) -> dict[str, Any]:
    """Counts and nanoseconds since the start, from the batcher's own timings: requests
    (one per request, however many rows), their inputs decoded, queued, computed (each
    item counted with its batch's time) and their outputs encoded."""
    stats = service.batcher.stats
    requests = service.requests
    zero = _duration(0, 0.0)
    return {
        "name": service.name,
        "version": service.version,
        "last_inference": round(stats.last_done * 1000) if stats.last_done else 0,
        "inference_count": stats.items_done,
        "execution_count": stats.batches_done,
        "inference_stats": {
            "success": _of(requests.success),
            "fail": _of(requests.fail),
            "queue": _duration(stats.items_done, stats.queue_seconds),
            "compute_input": _of(requests.decode),
            "compute_infer": _duration(stats.items_done, stats.item_compute_seconds),
            "compute_output": _of(requests.encode),
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": zero,
                "compute_infer": _duration(count, stats.compute_seconds_by_size[size]),
                "compute_output": zero,
            }
            for size, count in sorted(stats.batch_sizes.items())
        ],
    }


def statistics(engine: Engine, name: str = "", version: str = "") -> dict[str, Any]:
    services = [find(engine, name, version)] if name else engine.all_services()
    return {"model_stats": [model_statistics(service) for service in services]}


async def infer(service: TaskService, request: InferRequest, max_rows: int) -> InferResponse:
    """Answers ``request``: each of its rows is one item of the task's batcher, batched
    with everything else; the first row that fails fails the request, naming its index.
    Counted in the model's statistics."""
    started = time.perf_counter()
    try:
        response = await _infer(service, request, max_rows)
    except BaseException:
        service.requests.fail.add(time.perf_counter() - started)
        raise
    service.requests.success.add(time.perf_counter() - started)
    return response


async def _infer(service: TaskService, request: InferRequest, max_rows: int) -> InferResponse:
    form = _form(service)
    task = service.task
    rows = _check_inputs(form.inputs, request.inputs, max_rows)
    parameters = {k: v for k, v in request.parameters.items() if k not in _TRANSPORT_PARAMETERS}
    timeout = _timeout(parameters.pop(TIMEOUT, None))
    priority = parameters.pop(PRIORITY, 0)
    declared = {spec.name: spec for spec in form.outputs}
    classification = _classification(request.outputs, declared, parameters)
    try:
        options = task.tensor_options(parameters)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise InputError(f"invalid parameters: {problems}") from None
    payloads = []
    for row in range(rows):
        values = {tensor.name: tensor.data[row] for tensor in request.inputs}
        try:
            payloads.append(task.tensor_payload(values))
        except InputError as exc:
            raise _row_error(row, exc) from None
    background = isinstance(priority, int) and priority >= BACKGROUND_PRIORITY
    try:
        results = await _run_rows(service, payloads, options, timeout, background)
    except TooLate as exc:
        if timeout is None or timeout >= service.settings.timeout:
            raise
        raise DeadlineExceeded(
            f"{exc}: the request's own deadline ({timeout:g} s) is shorter than the wait"
        ) from None
    encoding = time.perf_counter()
    tensors = task.tensor_outputs(results, options)
    outputs = []
    wanted = request.outputs or [Requested(spec.name) for spec in form.outputs]
    for requested in wanted:
        count = classification.get(requested.name)
        if count is not None:
            data = text_tensor([task.classification(result, count) for result in results])
            outputs.append(Tensor(requested.name, "BYTES", data.shape, data, requested.parameters))
            continue
        data = tensors[requested.name]
        spec = declared[requested.name]
        outputs.append(Tensor(spec.name, spec.datatype, data.shape, data, requested.parameters))
    service.requests.encode.add(time.perf_counter() - encoding)
    return InferResponse(service.name, request.id, outputs, service.version)


def _check_inputs(specs: tuple[TensorSpec, ...], inputs: list[Tensor], max_rows: int) -> int:
    """The number of rows, once every input the model takes is there and fits."""
    given = {tensor.name: tensor for tensor in inputs}
    if len(given) != len(inputs):
        raise InputError("an input is given twice; send each once")
    takes = ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in specs)
    for spec in specs:
        tensor = given.pop(spec.name, None)
        if tensor is None:
            raise InputError(f"input {spec.name!r} is missing; the model takes {takes}")
        spec.check(tensor.datatype, tensor.shape)
    if given:
        raise InputError(f"unknown input {next(iter(given))!r}; the model takes {takes}")
    rows = {tensor.shape[0] for tensor in inputs}
    if len(rows) > 1:
        raise InputError(f"the inputs have different numbers of rows: {sorted(rows)}")
    (count,) = rows
    if count > max_rows:
        raise InputError(
            f"{count} rows in one request; send at most {max_rows} (MAX_QUEUE_SIZE)", 413
        )
    return count


def _is_count(value: Any) -> bool:
    """Whether a parameter's value is a whole number of at least 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _timeout(value: Any) -> float | None:
    """The ``timeout`` parameter, in microseconds, as seconds."""
    if value is None:
        return None
    if not _is_count(value):
        raise InputError(
            f"parameter 'timeout' must be a positive number of microseconds, got {value!r}"
        )
    return float(value) / 1e6


def _classification(
    outputs: list[Requested], declared: dict[str, TensorSpec], parameters: dict[str, Any]
) -> dict[str, int]:
    """The outputs asked for as classes (Triton's ``classification`` parameter), by name,
    with how many; the task is asked for at least that many (``top_k``)."""
    counts = {}
    for requested in outputs:
        if requested.name not in declared:
            raise InputError(
                f"unknown output {requested.name!r}; the model gives {', '.join(declared)}"
            )
        count = requested.parameters.get("classification")
        if count is None:
            continue
        if not _is_count(count):
            raise InputError(f"output {requested.name!r}: classification must be a count >= 1")
        counts[requested.name] = count
    if counts:
        parameters["top_k"] = max([*counts.values(), parameters.get("top_k") or 0])
    return counts


def _row_error(row: int, error: InputError) -> InputError:
    """``error`` naming its row; 400 unless too large (413), as the protocol has no 415."""
    return InputError(f"row {row}: {error}{error.advice}", 413 if error.status == 413 else 400)


async def _run_rows(
    service: TaskService, payloads: list[Any], options: Any, within: float | None, background: bool
) -> list[Any]:
    if len(payloads) == 1:  # the usual case: no task to make
        try:
            return [await service.run(payloads[0], options, within=within, background=background)]
        except InputError as exc:
            raise _row_error(0, exc) from None
    runs = [
        asyncio.ensure_future(service.run(p, options, within=within, background=background))
        for p in payloads
    ]
    try:
        await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for run in runs:
            run.cancel()
    failures = [
        (row, run.exception())
        for row, run in enumerate(runs)
        if run.done() and not run.cancelled() and run.exception() is not None
    ]
    if failures:
        row, error = failures[0]
        if isinstance(error, InputError):
            raise _row_error(row, error) from None
        assert error is not None
        raise error
    return [run.result() for run in runs]
