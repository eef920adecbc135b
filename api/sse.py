"""Server-sent events for a job: replay from Last-Event-ID, live progress, heartbeats."""

import asyncio
import json
from collections.abc import AsyncIterator

from jobs import Job, JobEvent


def encode(event: JobEvent) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n"


async def job_events(
    job: Job, after: int, stopping: asyncio.Event, heartbeat_s: float
) -> AsyncIterator[str]:
    """Every event of ``job`` with an id above ``after``, as they happen, ending with the
    final one; a comment line every ``heartbeat_s`` while nothing happens. When the
    server shuts down, a ``shutdown`` event tells the client to reconnect elsewhere."""
    sent = after
    delivered_final = False
    while True:
        changed = job.changed
        for event in job.events[sent:]:
            yield encode(event)
            sent = event.id
            delivered_final = event is job.final_event()
        if job.finished:
            final = job.final_event()
            if not delivered_final and final is not None:
                yield encode(final)  # a client resuming after the end still gets the ending
            return
        if stopping.is_set():
            data = {"status": job.status.value, "detail": "server shutting down; reconnect"}
            yield f"event: shutdown\ndata: {json.dumps(data)}\n\n"
            return
        waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stopping.wait())]
        done, pending = await asyncio.wait(
            waiters, timeout=heartbeat_s, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()
        if not done:
            yield ": heartbeat\n\n"
