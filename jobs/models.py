"""A job, its per-item results and the event log that SSE clients replay."""

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
_FINAL_EVENT = {
    JobStatus.SUCCEEDED: "done",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One server-sent event. ``id`` counts from 1 in the order events happened."""

    id: int
    kind: str
    data: dict[str, Any]


@dataclass(eq=False)
class Job:
    """Mutated only on the event loop. ``done`` counts finished items, failed ones too."""

    total: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    finished_monotonic: float | None = None
    done: int = 0
    failed: int = 0
    results: list[dict[str, Any] | None] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.results = [None] * self.total

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change; take it before reading the state it guards."""
        return self._changed

    def progress(self) -> dict[str, int]:
        return {"done": self.done, "failed": self.failed, "total": self.total}

    def start(self) -> None:
        if self.status is JobStatus.QUEUED:
            self.status = JobStatus.RUNNING
            self.started_at = _now()
            self._notify()

    def record(self, index: int, result: dict[str, Any], *, ok: bool) -> None:
        """Stores item ``index``'s result (or ``{"error": ...}``) and emits a progress event."""
        if self.finished or self.results[index] is not None:
            return
        self.results[index] = result
        self.done += 1
        self.failed += 0 if ok else 1
        self._emit("progress", {"index": index, **self.progress(), "result": result})

    def finish(self, status: JobStatus) -> None:
        """Moves to a final status once; later calls are ignored."""
        if self.finished:
            return
        self.status = status
        self.finished_at = _now()
        self.finished_monotonic = time.monotonic()
        self._emit(_FINAL_EVENT[status], {"status": status.value, **self.progress()})

    def final_event(self) -> JobEvent | None:
        return self.events[-1] if self.finished else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "job_id": self.id,
            "status": self.status.value,
            "progress": self.progress(),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "results": self.results,
        }

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append(JobEvent(len(self.events) + 1, kind, data))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
