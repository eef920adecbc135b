"""Server-sent events for a job: replay from Last-Event-ID, live progress, heartbeats."""

import asyncio
import json
from collections.abc import AsyncIterator

from jobs import JobEvent, JobStore, StoreUnavailable


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
    sent = after
    read_from = max(after - 1, 0)  # the event at ``after`` itself, to tell if it was final
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
