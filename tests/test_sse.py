"""The SSE stream of one job, in-process, over the memory store."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from api.sse import job_events
from jobs import MemoryJobStore, StoreLimits

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store() -> AsyncIterator[MemoryJobStore]:
    store = MemoryJobStore(limits=StoreLimits(10, 100, 10_000), ttl_s=60)
    await store.start()
    yield store
    await store.close()


async def new_job(store: MemoryJobStore, images: int) -> str:
    summary, _ = await store.create([b"img"] * images)
    return str(summary["job_id"])


async def finish_one(store: MemoryJobStore) -> None:
    (item,) = await store.take(1, 1)
    await store.record(item, {"label": "cat"}, ok=True)


async def test_idle_stream_sends_heartbeats_then_follows_the_job(store: MemoryJobStore) -> None:
    job_id = await new_job(store, 2)
    stream = job_events(store, job_id, 0, asyncio.Event(), heartbeat_s=0.05)
    assert await asyncio.wait_for(anext(stream), 1) == ": heartbeat\n\n"
    await finish_one(store)
    assert (await asyncio.wait_for(anext(stream), 1)).startswith("id: 1\nevent: progress\n")
    await finish_one(store)
    assert (await anext(stream)).startswith("id: 2\nevent: progress\n")
    assert (await anext(stream)).startswith("id: 3\nevent: done\n")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_a_client_resuming_after_the_end_gets_the_final_event(
    store: MemoryJobStore,
) -> None:
    job_id = await new_job(store, 1)
    await finish_one(store)
    events = [event async for event in job_events(store, job_id, 2, asyncio.Event(), 1)]
    assert len(events) == 1
    assert events[0].startswith("id: 2\nevent: done\n")
    resumed = [event async for event in job_events(store, job_id, 1, asyncio.Event(), 1)]
    assert resumed == events


async def test_stream_ends_with_a_shutdown_event_when_the_server_stops(
    store: MemoryJobStore,
) -> None:
    job_id = await new_job(store, 3)
    stopping = asyncio.Event()
    stream = job_events(store, job_id, 0, stopping, heartbeat_s=10)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    stopping.set()
    store.feed.close()
    assert (await asyncio.wait_for(pending, 1)).startswith("event: shutdown\n")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_disconnected_clients_leave_no_task_and_no_watch_behind(
    store: MemoryJobStore,
) -> None:
    job_id = await new_job(store, 1)
    tasks_before = len(asyncio.all_tasks())
    streams = [job_events(store, job_id, 0, asyncio.Event(), heartbeat_s=0.01) for _ in range(100)]
    for stream in streams:
        assert await anext(stream) == ": heartbeat\n\n"
    pending = [asyncio.ensure_future(anext(stream)) for stream in streams]
    await asyncio.sleep(0)
    assert len(store.feed) == 100
    # A client going away cancels its stream mid-wait, then the server closes it.
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for stream in streams:
        await stream.aclose()
    await asyncio.sleep(0.05)
    assert len(store.feed) == 0
    assert len(asyncio.all_tasks()) == tasks_before
