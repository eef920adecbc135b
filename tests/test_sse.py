"""The SSE stream of one job, in-process."""

import asyncio

import pytest

from api.sse import job_events
from jobs import Job, JobStatus

pytestmark = pytest.mark.anyio


async def test_idle_stream_sends_heartbeats_then_follows_the_job() -> None:
    job = Job(total=1)
    stopping = asyncio.Event()
    stream = job_events(job, 0, stopping, heartbeat_s=0.05)
    assert await asyncio.wait_for(anext(stream), 1) == ": heartbeat\n\n"
    job.record(0, {"prediction": {}}, ok=True)
    assert (await anext(stream)).startswith("id: 1\nevent: progress\n")
    job.finish(JobStatus.SUCCEEDED)
    assert (await anext(stream)).startswith("id: 2\nevent: done\n")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_stream_ends_with_a_shutdown_event_when_the_server_stops() -> None:
    job = Job(total=3)
    stopping = asyncio.Event()
    stream = job_events(job, 0, stopping, heartbeat_s=10)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    stopping.set()
    assert (await asyncio.wait_for(pending, 1)).startswith("event: shutdown\n")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
