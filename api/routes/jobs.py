"""The asynchronous job API: submit, poll, stream progress, cancel."""

import asyncio
import re
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from api.deps import EngineDep
from api.errors import describe
from api.payloads import read_job_payloads
from api.schemas import error_responses
from api.sse import job_events
from jobs import JobStatus, JobStore, content_digest
from serving import Engine, InputError, Payload, Task
from serving.service import pack_job_item

router = APIRouter(prefix="/jobs", tags=["jobs"])

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _store(engine: EngineDep) -> JobStore:
    if engine.jobs_disabled:
        raise HTTPException(503, engine.jobs_disabled)
    return engine.job_store


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(404, f"no job {job_id!r}: it never existed or expired (JOB_TTL_S)")


async def _job(engine: EngineDep, job_id: str) -> dict[str, Any]:
    job = await _store(engine).get(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise _not_found(job_id)
    return job


def job_options(task: Task[Any, Any], query: Mapping[str, str]) -> BaseModel:
    """The task's ``Options`` from a job's query parameters, or 422 as for the task's own
    route."""
    try:
        return task.Options.model_validate(dict(query))
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("query", *error["loc"])} for error in exc.errors()]
        ) from None


async def create_job(
    request: Request,
    engine: Engine,
    task: str,
    idempotency_key: str | None,
    options: BaseModel | None = None,
) -> JSONResponse:
    """Stores a job of the request's items for ``task``, computed with ``options`` (by
    default those of the request's query), and answers 202 with its summary."""
    store = _store(engine)
    engine.require_ready()
    settings = engine.settings
    declared = request.headers.get("content-length", "")
    task_object = engine.service(task).task
    if options is None:
        options = job_options(task_object, request.query_params)
    chosen = options.model_dump(mode="json", exclude_defaults=True)
    size = int(declared) if declared.isdigit() else settings.max_job_bytes
    # Refused before the body is read when the store is full; room is held until the
    # job exists, so that concurrent uploads cannot all pass.
    async with store.admit(min(size, settings.max_job_bytes)):
        items = await read_job_payloads(request, settings.max_job_files, task_object.jobs_field)
        # Off the event loop: a JSON item is serialised again, up to MAX_JOB_BYTES.
        payload = await asyncio.to_thread(_pack, items, task_object, chosen)
        del items
        digest = "" if idempotency_key is None else await asyncio.to_thread(content_digest, payload)
        job, created = await store.create(payload, idempotency_key, task, digest)
    headers = {"Location": f"/jobs/{job['job_id']}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job, 202, headers=headers)


def _pack(
    items: list[Payload | InputError], task: Task[Any, Any], options: dict[str, Any]
) -> list[bytes | dict[str, Any]]:
    """Each item as a job store keeps it, with the job's ``options``; one the task can
    never take becomes its error result at once."""
    packed: list[bytes | dict[str, Any]] = []
    for item in items:
        if not isinstance(item, (bytes, InputError)):
            try:
                task.check_item(item)
            except InputError as exc:
                item = exc
        packed.append(
            {"error": describe(item)}
            if isinstance(item, InputError)
            else pack_job_item(item, options)
        )
    return packed


JOB_ERRORS = error_responses(
    {
        400: "Invalid JSON",
        413: "Over MAX_JOB_BYTES or MAX_JOB_FILES",
        415: "A content type that is not accepted",
        422: "No items, a malformed Idempotency-Key, or one already used with other items",
        503: "Jobs disabled or unavailable, too many jobs, or not ready; see Retry-After",
    }
)
_FOUND_OR_NOT = error_responses(
    {
        404: "No such job: it never existed or expired (JOB_TTL_S)",
        503: "Jobs are disabled or the job store is unavailable; see Retry-After",
    }
)


@router.post("", status_code=202, responses=JOB_ERRORS)
async def submit(
    request: Request,
    engine: EngineDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """A job for the first task in TASKS (`/cls` by default), as `POST /{task}/jobs`:
    multipart `files` parts, or JSON with the task's list field (`{"images": [...]}`
    for /cls). The task's options are query parameters, as on its own route, and apply
    to every item. A retried submission with the same `Idempotency-Key` returns the job
    it created."""
    return await create_job(request, engine, engine.primary.name, idempotency_key)


@router.get("/{job_id}", responses=_FOUND_OR_NOT)
async def status(job_id: str, engine: EngineDep) -> dict[str, Any]:
    """Status, progress and the results so far, one per input, in input order."""
    return await _job(engine, job_id)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    responses={**_FOUND_OR_NOT, **error_responses({409: "The job already ended"})},
)
async def cancel(job_id: str, engine: EngineDep) -> dict[str, Any]:
    """Cancels the job on every replica; its queued items are never computed, and what
    it computed stays readable until it expires. 409 if it already ended."""
    store = _store(engine)
    outcome = await store.cancel(job_id) if _JOB_ID.fullmatch(job_id) else None
    if outcome is None:
        raise _not_found(job_id)
    if outcome is not JobStatus.CANCELLED:
        raise HTTPException(409, f"job {job_id} already {outcome.value}; nothing to cancel")
    job = await _job(engine, job_id)
    return {"job_id": job_id, "status": job["status"], "progress": job["progress"]}


@router.delete("/{job_id}", status_code=202, responses=_FOUND_OR_NOT)
async def delete(job_id: str, engine: EngineDep) -> dict[str, Any]:
    """Deletes the job: cancels it on every replica if it is still live, then forgets it
    with its results and events (its id answers 404 from then on). Answers its status
    and progress as they were at the end."""
    job = await _job(engine, job_id)
    outcome = await _store(engine).remove(job_id)
    if outcome is None:
        raise _not_found(job_id)
    return {"job_id": job_id, "status": outcome.value, "progress": job["progress"]}


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream"},
        **_FOUND_OR_NOT,
        **error_responses({422: "A Last-Event-ID that is not an event id (digits)"}),
    },
)
async def events(
    job_id: str,
    engine: EngineDep,
    last_event_id: Annotated[str, Header(pattern=r"^\s*[0-9]{1,18}\s*$")] = "",
) -> StreamingResponse:
    """Server-sent events: `progress` per finished item, then `done`, `failed` or
    `cancelled`. Send `Last-Event-ID` to resume after a disconnect, on any replica."""
    after = int(last_event_id) if last_event_id else 0
    await _job(engine, job_id)
    stream = job_events(
        _store(engine), job_id, after, engine.stopping, engine.settings.sse_heartbeat_s
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
