"""POST /{name} and POST /{name}/jobs for every task TASKS names."""

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from api.deps import EngineDep
from api.disconnect import cancel_on_disconnect
from api.payloads import read_payload
from api.routes.jobs import JOB_ERRORS, create_job
from api.schemas import error_responses
from serving import Engine, Task

ERRORS = error_responses(
    {
        400: "An input the task cannot use: corrupt, truncated, invalid JSON or base64",
        413: "Body over MAX_UPLOAD_BYTES, or an input over the task's limits",
        415: "A content type or input format that is not accepted",
        422: "The 'file' field or the JSON input is missing, or an option is out of range",
        503: "Queue full, the model not ready, or shutting down; see Retry-After",
        504: "No answer within TIMEOUT seconds",
    }
)


def _body(
    multipart_field: str, part: dict[str, Any], json_schema: dict[str, Any]
) -> dict[str, Any]:
    """An ``openapi_extra`` request body: a multipart form with one required field, or
    JSON."""
    multipart = {
        "type": "object",
        "required": [multipart_field],
        "properties": {multipart_field: part},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": json_schema},
            },
        }
    }


_FILE = {"type": "string", "format": "binary"}


def _request_body(task: Task[Any, Any]) -> dict[str, Any]:
    json_schema = task.json_schema or {"description": "The task's JSON input"}
    return _body("file", _FILE, json_schema)


def _fields(task: Task[Any, Any]) -> str:
    properties = (task.json_schema or {}).get("properties", {})
    return ", ".join(f"{name} ({spec.get('type', 'any')})" for name, spec in properties.items())


def _jobs_request_body(task: Task[Any, Any]) -> dict[str, Any]:
    # Any JSON value is taken: one that the task cannot use becomes that item's error in
    # the job's results, not the refusal of the whole job.
    fields = _fields(task)
    described = f" ({fields})" if fields else ""
    item = {"description": f"One input, as the task's JSON body holds it{described}"}
    json_schema = {
        "type": "object",
        "required": [task.jobs_field],
        "properties": {task.jobs_field: {"type": "array", "items": item, "minItems": 1}},
    }
    return _body("files", {"type": "array", "items": _FILE, "minItems": 1}, json_schema)


async def answer(request: Request, engine: Engine, name: str, options: BaseModel) -> Any:
    """The answer of task ``name`` to one input. Admitted at the door (api/door.py)
    before the upload was read; TIMEOUT counts from the end of the body, so a slow link
    does not use it up, and the service admits the request again with that deadline."""
    engine.service(name)  # 404 before the body, for a model not served
    payload = await read_payload(request)
    # Held to the end: a model version unloaded meanwhile answers it first.
    with engine.lease(name) as service:
        result = await cancel_on_disconnect(request, service.run(payload, options))
        return service.task.encode(result, options)


def task_router(task: Task[Any, Any]) -> APIRouter:
    """The routes of one task. Its options are query parameters."""
    router = APIRouter(tags=[task.name])
    name = task.name
    Options = task.Options

    async def predict(
        request: Request,
        engine: EngineDep,
        options: Annotated[Options, Query()],  # type: ignore[valid-type]
    ) -> Any:
        return await answer(request, engine, name, options)

    async def submit_job(
        request: Request,
        engine: EngineDep,
        options: Annotated[Options, Query()],  # type: ignore[valid-type]
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> JSONResponse:
        return await create_job(request, engine, name, idempotency_key, options)

    doc = (task.__doc__ or "").strip()
    router.add_api_route(
        f"/{name}",
        predict,
        methods=["POST"],
        response_model=task.Response,
        responses=ERRORS,
        openapi_extra=_request_body(task),
        summary=f"{name}: one input",
        description=f"{doc}\n\nSend one multipart `file`, or a JSON body.",
    )
    router.add_api_route(
        f"/{name}/jobs",
        submit_job,
        methods=["POST"],
        status_code=202,
        responses=JOB_ERRORS,
        openapi_extra=_jobs_request_body(task),
        summary=f"{name}: a job of many inputs",
        description=(
            "Queues many inputs as one job: multipart `files` parts, or JSON"
            f' `{{"{task.jobs_field}": [...]}}`. The options apply to every input. A retried'
            " submission with the same `Idempotency-Key` returns the job it created. Poll,"
            " stream and cancel it under /jobs/{id}."
        ),
    )
    return router


def late_models_router() -> APIRouter:
    """``POST /{name}`` and ``POST /{name}/jobs`` for repository models loaded after
    startup (MODEL_CONTROL), which have no route of their own; included last."""
    router = APIRouter(include_in_schema=False)

    def options_of(request: Request, service: Any) -> BaseModel:
        try:
            options: BaseModel = service.task.Options.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        return options

    @router.post("/{name}")
    async def predict(request: Request, engine: EngineDep, name: str) -> Any:
        return await answer(request, engine, name, options_of(request, engine.service(name)))

    @router.post("/{name}/jobs", status_code=202)
    async def submit_job(
        request: Request,
        engine: EngineDep,
        name: str,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> JSONResponse:
        options = options_of(request, engine.service(name))
        return await create_job(request, engine, name, idempotency_key, options)

    return router
