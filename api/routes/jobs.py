"""The asynchronous job API: submit, poll, stream progress, cancel."""

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import RuntimeDep
from api.exceptions import NotReady
from api.sse import job_events
from api.upload import read_job_images
from jobs import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _job(runtime: RuntimeDep, job_id: str) -> Job:
    job = runtime.jobs.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}: it never existed or expired (JOB_TTL_S)")
    return job


@router.post("", status_code=202)
async def submit(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Queues many images as one job: multipart `files` parts, or JSON `{"images": [...]}`."""
    runtime.require_warm()
    if runtime.stopping.is_set():
        raise NotReady("the server is shutting down")
    items = await read_job_images(request, runtime.settings.max_job_files)
    job = runtime.jobs.submit(items)
    body = {"job_id": job.id, "status": job.status.value, "total": job.total}
    return JSONResponse(body, 202, headers={"Location": f"/jobs/{job.id}"})


@router.get("/{job_id}")
async def status(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    """Status, progress and the results so far, one per input, in input order."""
    return _job(runtime, job_id).snapshot()


@router.delete("/{job_id}", status_code=202)
async def cancel(job_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    """Cancels the job; its queued items are never computed. 409 if it already ended."""
    job = _job(runtime, job_id)
    if not runtime.jobs.cancel(job):
        raise HTTPException(409, f"job {job_id} already {job.status.value}; nothing to cancel")
    return {"job_id": job.id, "status": job.status.value, "progress": job.progress()}


@router.get("/{job_id}/events")
async def events(
    job_id: str,
    runtime: RuntimeDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: `progress` per finished item, then `done`, `failed` or
    `cancelled`. Send `Last-Event-ID` to resume after a disconnect."""
    job = _job(runtime, job_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    stream = job_events(job, after, runtime.stopping, runtime.settings.sse_heartbeat_s)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
