"""What the job stores share: statuses, events, and the unit of work a replica takes."""

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


LIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
FINAL_EVENT = {
    JobStatus.SUCCEEDED: "done",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}

ItemResult = dict[str, Any]
"""One item's result: the task's answer, or ``{"error": {"status", "detail"}}``."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def completion_status(failed: int, total: int) -> JobStatus:
    """How a job whose every item has a result ends: failed only if all items failed."""
    return JobStatus.FAILED if failed == total else JobStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One server-sent event. ``id`` counts from 1 in the order the job's events happened,
    whichever replica wrote them."""

    id: int
    kind: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.kind in FINAL_EVENT.values()


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One item of one job, handed to a replica to compute with the job's ``task``.

    ``delivery`` counts how many times the store has handed this item out, this time
    included: above 1 the item was taken over from a replica that stopped answering.
    ``data`` is None when the job ended and its items were freed. ``handle`` is the
    store's own reference to the delivery.
    """

    job_id: str
    index: int
    data: bytes | None
    delivery: int
    handle: str
    task: str = ""
