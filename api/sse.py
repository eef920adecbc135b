"""Server-sent events for a job: replay from Last-Event-ID, live progress, heartbeats."""

import asyncio
import json
from collections.abc import AsyncIterator

from jobs import JobEvent, JobStore, StoreUnavailable

LIVE = ("queued", "running")


def encode(event: JobEvent) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n"


def _shutdown(detail: str) -> str:
    return f"event: shutdown\ndata: {json.dumps({'detail': detail})}\n\n"


async def job_events(
    store: JobStore, job_id: str, after: int, stopping: asyncio.Event, heartbeat_s: float
) -> AsyncIterator[str]:
    """Every event of the job with an id above ``after``, as they happen, ending with
    the final one, which a client resuming after the end also gets; a comment line every
    ``heartbeat_s`` while nothing happens. When the server shuts down, a ``shutdown``
    event tells the client to reconnect elsewhere. Leaves nothing behind when the client
    goes away."""
    feed = store.feed
    sent = await _resume_point(store, job_id, after) if after > 0 else 0
    read_from = max(sent - 1, 0)  # the event at ``sent`` itself, to tell if it was final
    while True:
        watch = feed.watch(job_id)
        try:
            try:
                events = await store.events(job_id, read_from)
            except StoreUnavailable:
                events = []  # keep the stream open; the next heartbeat reads again
            if events is None:
                return  # the job expired while the client watched
            for event in events:
                if event.id > sent or (event.id == sent and event.final):
                    yield encode(event)
                sent = max(sent, event.id)
                if event.final:
                    return
            read_from = sent
            if stopping.is_set():
                yield _shutdown("the server is shutting down; reconnect with Last-Event-ID")
                return
            if not await feed.wait(watch, heartbeat_s):
                yield ": heartbeat\n\n"
        finally:
            feed.forget(job_id, watch)


async def _resume_point(store: JobStore, job_id: str, after: int) -> int:
    """The last event a client that saw event ``after`` has: ``after``, or for an id
    past the job's last event, that last event (so that a finished job's final event is
    sent again and the stream closes, rather than waiting for an event that will never
    come)."""
    try:
        job = await store.get(job_id)
    except StoreUnavailable:
        return after
    if job is None:
        return after
    # Events are numbered from 1: a progress event per finished item, then the final one.
    last: int = job["progress"]["done"] + (job["status"] not in LIVE)
    return min(after, last)
