"""The asynchronous job API: submit, poll, stream progress, cancel."""

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import RuntimeDep
from api.errors import describe
from api.exceptions import NotReady
from api.sse import job_events
from api.upload import read_job_images
from jobs import JobStatus, JobStore

router = APIRouter(prefix="/jobs", tags=["jobs"])

_JOB_ID = re.compile(r"[0-9a-f]{32}")
_EVENT_ID = re.compile(r"[0-9]{1,18}")


def _store(runtime: RuntimeDep) -> JobStore:
    if runtime.jobs_disabled:
        raise HTTPException(503, runtime.jobs_disabled)
    return runtime.job_store


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(404, f"no job {job_id!r}: it never existed or expired (JOB_TTL_S)")


async def _job(runtime: RuntimeDep, job_id: str) -> dict[str, Any]:
    job = await _store(runtime).get(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise _not_found(job_id)
    return job


@router.post("", status_code=202)
async def submit(
    request: Request,
    runtime: RuntimeDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Queues many images as one job: multipart `files` parts, or JSON `{"images": [...]}`.
    A retried submission with the same `Idempotency-Key` returns the job it created."""
    store = _store(runtime)
    runtime.require_warm()
    if runtime.stopping.is_set():
        raise NotReady("the server is shutting down")
    settings = runtime.settings
    declared = request.headers.get("content-length", "")
    # Refused before the body is read when the store is full.
    await store.admit(int(declared) if declared.isdigit() else settings.max_job_bytes)
    items = await read_job_images(request, settings.max_job_files)
    payload = [item if isinstance(item, bytes) else {"error": describe(item)} for item in items]
    del items
    job, created = await store.create(payload, idempotency_key)
    headers = {"Location": f"/jobs/{job['job_id']}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(job, 202, headers=headers)


@router.get("/{job_id}")
async def status(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    """Status, progress and the results so far, one per input, in input order."""
    return await _job(runtime, job_id)


@router.delete("/{job_id}", status_code=202)
async def cancel(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    """Cancels the job on every replica; its queued items are never computed. 409 if it
    already ended."""
    store = _store(runtime)
    outcome = await store.cancel(job_id) if _JOB_ID.fullmatch(job_id) else None
    if outcome is None:
        raise _not_found(job_id)
    if outcome is not JobStatus.CANCELLED:
        raise HTTPException(409, f"job {job_id} already {outcome.value}; nothing to cancel")
    job = await _job(runtime, job_id)
    return {"job_id": job_id, "status": job["status"], "progress": job["progress"]}


@router.get("/{job_id}/events")
async def events(
    job_id: str,
    runtime: RuntimeDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: `progress` per finished item, then `done`, `failed` or
    `cancelled`. Send `Last-Event-ID` to resume after a disconnect, on any replica."""
    after = 0
    if last_event_id:
        if not _EVENT_ID.fullmatch(last_event_id.strip()):
            raise HTTPException(
                400, "Last-Event-ID must be the id of an event this stream sent (digits)"
            )
        after = int(last_event_id)
    await _job(runtime, job_id)
    stream = job_events(
        _store(runtime), job_id, after, runtime.stopping, runtime.settings.sse_heartbeat_s
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
