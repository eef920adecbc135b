"""One contract for both job stores: the memory store and the Redis store (against a real
redis-server) must behave the same, so they cannot drift."""

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from jobs import (
    IdempotencyConflict,
    JobStatus,
    JobStore,
    MemoryJobStore,
    RedisJobStore,
    StoreFull,
    StoreLimits,
    WorkItem,
    content_digest,
    scripts,
)
from tests.services import RedisServer, redis_server

pytestmark = pytest.mark.anyio

LIMITS = StoreLimits(max_jobs=3, max_items=10, max_bytes=1000)
ERROR = {"error": {"status": 400, "detail": "not an image"}}


@pytest.fixture(scope="module")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def open_store(
    kind: str,
    redis: RedisServer | None,
    limits: StoreLimits = LIMITS,
    ttl_s: float = 60,
    prefix: str | None = None,
    timeout_s: float = 2.0,
) -> JobStore:
    if kind == "memory":
        return MemoryJobStore(limits=limits, ttl_s=ttl_s)
    assert redis is not None
    return RedisJobStore(
        redis.url,
        prefix=prefix or f"test-{uuid.uuid4().hex[:8]}",  # a fresh namespace per test
        limits=limits,
        ttl_s=ttl_s,
        timeout_s=timeout_s,
        claim_idle_s=0.3,
    )


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[JobStore]:
    redis = request.getfixturevalue("redis_service") if request.param == "redis" else None
    store = open_store(request.param, redis)
    await store.start()
    yield store
    await store.close()


async def take_all(store: JobStore, expected: int) -> list[WorkItem]:
    items: list[WorkItem] = []
    while len(items) < expected:
        got = await store.take(expected - len(items), 2.0)
        assert got, f"only {len(items)} of {expected} items were handed out"
        items += got
    return items


async def test_a_job_is_created_worked_and_finished(store: JobStore) -> None:
    summary, created = await store.create([b"one", b"two"])
    assert created
    assert summary["status"] == "queued"
    assert summary["total"] == 2
    job_id = summary["job_id"]
    items = await take_all(store, 2)
    assert sorted((item.index, item.data) for item in items) == [(0, b"one"), (1, b"two")]
    assert all(item.delivery == 1 for item in items)
    assert await store.begin(items[0])
    running = await store.get(job_id)
    assert running is not None
    assert running["status"] == "running"
    assert running["started_at"] is not None
    await store.record(items[0], {"label": items[0].index}, ok=True)
    await store.record(items[1], ERROR, ok=False)
    job = await store.get(job_id)
    assert job is not None
    assert job["status"] == "succeeded"
    assert job["progress"] == {"done": 2, "failed": 1, "total": 2}
    results = {items[0].index: {"label": items[0].index}, items[1].index: ERROR}
    assert job["results"] == [results[0], results[1]]
    events = await store.events(job_id, 0)
    assert events is not None
    assert [(e.id, e.kind) for e in events] == [(1, "progress"), (2, "progress"), (3, "done")]
    assert events[-1].data == {"status": "succeeded", "done": 2, "failed": 1, "total": 2}
    assert events[0].data["result"] == results[events[0].data["index"]]
    assert [e.id for e in await store.events(job_id, 2) or []] == [3]


async def test_a_redelivered_item_is_counted_once(store: JobStore) -> None:
    summary, _ = await store.create([b"a", b"b"])
    first, second = await take_all(store, 2)
    await store.record(first, {"n": 1}, ok=True)
    await store.record(first, {"n": 2}, ok=True)
    job = await store.get(summary["job_id"])
    assert job is not None
    assert job["progress"]["done"] == 1
    assert job["results"][first.index] == {"n": 1}
    await store.record(second, {"n": 3}, ok=True)
    events = await store.events(summary["job_id"], 0) or []
    assert [e.kind for e in events] == ["progress", "progress", "done"]


async def test_unreadable_items_are_results_from_the_start(store: JobStore) -> None:
    summary, _ = await store.create([ERROR, b"x"])
    job = await store.get(summary["job_id"])
    assert job is not None
    assert job["progress"] == {"done": 1, "failed": 1, "total": 2}
    assert job["results"] == [ERROR, None]
    assert [item.index for item in await take_all(store, 1)] == [1]


async def test_redis_writes_no_image_of_a_job_that_does_not_fit(
    redis_service: RedisServer,
) -> None:
    store = open_store("redis", redis_service)
    await store.start()
    try:
        summary, _ = await store.create([b"x" * 600], "key-1", digest="d")

        def writes() -> int:
            with redis_service.client() as client:
                return int(client.info("commandstats").get("cmdstat_hset", {}).get("calls", 0))

        before = writes()
        with pytest.raises(StoreFull, match="MAX_QUEUED_JOB_BYTES"):
            await store.create([b"y" * 600])  # 1200 bytes queued would pass 1000
        assert writes() == before  # refused before its images were sent to Redis
        # A replay of a job already made needs no room: it is answered, not refused.
        again, created = await store.create([b"x" * 600], "key-1", digest="d")
        assert (again["job_id"], created) == (summary["job_id"], False)
    finally:
        await store.close()


async def test_a_job_whose_items_are_all_unreadable_fails_at_once(store: JobStore) -> None:
    summary, _ = await store.create([ERROR, ERROR])
    job = await store.get(summary["job_id"])
    assert job is not None
    assert job["status"] == "failed"
    assert await store.take(5, 0.2) == []


async def test_limits_count_live_jobs_and_queued_images_only(store: JobStore) -> None:
    with pytest.raises(StoreFull, match="MAX_QUEUED_JOB_ITEMS"):
        await store.create([b"x"] * 11)
    with pytest.raises(StoreFull, match="MAX_QUEUED_JOB_BYTES"):
        await store.create([b"x" * 1001])
    with pytest.raises(StoreFull, match="MAX_QUEUED_JOB_BYTES"):
        await admitted(store, 1001)
    jobs = [(await store.create([b"x" * 100]))[0]["job_id"] for _ in range(3)]
    with pytest.raises(StoreFull, match="MAX_JOBS"):
        await admitted(store, 10)
    with pytest.raises(StoreFull, match="MAX_JOBS"):
        await store.create([b"y"])
    # Finished jobs do not block new ones.
    item = (await take_all(store, 1))[0]
    await store.record(item, {"ok": True}, ok=True)
    assert await store.cancel(jobs[1]) is JobStatus.CANCELLED
    await admitted(store, 900)
    _, created = await store.create([b"z" * 800])
    assert created
    with pytest.raises(StoreFull, match="MAX_QUEUED_JOB_BYTES"):
        await admitted(store, 101)


async def admitted(store: JobStore, nbytes: int) -> None:
    async with store.admit(nbytes):
        pass


async def test_room_is_held_while_a_body_is_read(store: JobStore) -> None:
    """Uploads read at the same time cannot each pass admission (limits as in
    test_limits_count_live_jobs_and_queued_images_only)."""
    async with store.admit(600):
        with pytest.raises(StoreFull, match="MAX_QUEUED_JOB_BYTES"):
            await admitted(store, 500)
        async with store.admit(400):
            # The job itself is checked on what it holds, not on the room held for it.
            _, created = await store.create([b"x" * 300])
            assert created
            with pytest.raises(StoreFull, match="MAX_JOBS"):
                await admitted(store, 1)
    with pytest.raises(RuntimeError):
        async with store.admit(1000 - 300):
            raise RuntimeError("the upload broke off")
    # Room held for bodies that failed, or became jobs, is given back.
    await admitted(store, 700)
    with pytest.raises(StoreFull, match="MAX_QUEUED_JOB_BYTES"):
        await admitted(store, 701)


async def test_cancel_ends_a_live_job_and_frees_its_items(store: JobStore) -> None:
    cancelled: list[str] = []
    store.on_cancel(cancelled.append)
    summary, _ = await store.create([b"a", b"b", b"c"])
    job_id = summary["job_id"]
    first = (await take_all(store, 1))[0]
    assert await store.cancel(job_id) is JobStatus.CANCELLED
    assert await store.cancel(job_id) is JobStatus.CANCELLED
    for _ in range(50):
        if cancelled:
            break
        await asyncio.sleep(0.02)  # the Redis store hears of it through pub/sub
    assert cancelled == [job_id]
    assert not await store.begin(first)
    rest = await take_all(store, 2)
    assert all(item.data is None for item in rest)
    for item in rest:
        assert not await store.begin(item)
        await store.discard(item)
    await store.record(first, {"late": True}, ok=True)
    job = await store.get(job_id)
    assert job is not None
    assert job["status"] == "cancelled"
    assert job["progress"]["done"] == 0
    events = await store.events(job_id, 0) or []
    assert [e.kind for e in events] == ["cancelled"]
    # Nothing of the cancelled job counts against the limits any more.
    await admitted(store, 1000)
    assert await store.cancel("0" * 32) is None


async def test_remove_cancels_a_live_job_and_forgets_any_job(store: JobStore) -> None:
    live, _ = await store.create([b"a", b"b"], idempotency_key="k")
    finished, _ = await store.create([ERROR])
    cancelled: list[str] = []
    store.on_cancel(cancelled.append)
    assert await store.remove(live["job_id"]) is JobStatus.CANCELLED
    assert await store.remove(finished["job_id"]) is JobStatus.FAILED
    for job_id in (live["job_id"], finished["job_id"]):
        assert await store.get(job_id) is None
        assert await store.events(job_id, 0) is None
        assert await store.remove(job_id) is None
    # Its items are discarded, not computed; its key and queued images are free again.
    for item in await take_all(store, 2):
        assert not await store.begin(item)
        await store.discard(item)
    again, created = await store.create([b"a", b"b"], idempotency_key="k")
    assert created
    assert again["job_id"] != live["job_id"]
    if isinstance(store, MemoryJobStore):
        assert (store.live_jobs, store.queued_items) == (1, 2)
        assert store.finished_bytes == 0
    for _ in range(50):  # the cancel reaches a Redis store's listener shortly
        if cancelled:
            break
        await asyncio.sleep(0.05)
    assert cancelled == [live["job_id"]]


async def test_a_finished_job_cannot_be_cancelled(store: JobStore) -> None:
    summary, _ = await store.create([ERROR])
    assert await store.cancel(summary["job_id"]) is JobStatus.FAILED


async def test_an_idempotency_key_returns_the_same_job(store: JobStore) -> None:
    first, created = await store.create([b"a"], idempotency_key="client-42")
    again, created_again = await store.create([b"a"], idempotency_key="client-42")
    other, _ = await store.create([b"a"], idempotency_key="client-43")
    assert created
    assert not created_again
    assert again["job_id"] == first["job_id"]
    assert other["job_id"] != first["job_id"]
    assert len(await take_all(store, 2)) == 2
    assert await store.take(5, 0.2) == []


async def test_an_idempotency_key_is_scoped_to_the_task_and_the_items(store: JobStore) -> None:
    photos = [b"a", b"b"]
    first, _ = await store.create(photos, "k", "classify", content_digest(photos))
    again, created = await store.create(photos, "k", "classify", content_digest(photos))
    assert (again["job_id"], created) == (first["job_id"], False)
    # The same key on another task's route is another job.
    other, created = await store.create(photos, "k", "embed", content_digest(photos))
    assert created
    assert other["job_id"] != first["job_id"]
    # With other items it is a mistake, not a retry.
    for items in ([b"a", b"c"], [b"a"], [b"a", ERROR]):
        with pytest.raises(IdempotencyConflict, match=first["job_id"]):
            await store.create(items, "k", "classify", content_digest(items))


async def test_finished_jobs_beyond_their_budget_are_forgotten_oldest_first(
    request: pytest.FixtureRequest, store: JobStore
) -> None:
    kind = "redis" if isinstance(store, RedisJobStore) else "memory"
    redis = request.getfixturevalue("redis_service") if kind == "redis" else None
    # Each job of 10 unreadable items keeps about 2.3 KB: room for about four.
    limits = StoreLimits(max_jobs=3, max_items=10, max_bytes=1000, max_finished_bytes=10_000)
    small = open_store(kind, redis, limits)
    await small.start()
    try:
        ids = [(await small.create([ERROR] * 10))[0]["job_id"] for _ in range(20)]
        kept = [job_id for job_id in ids if await small.get(job_id) is not None]
        assert 3 <= len(kept) <= 5, kept
        assert kept == ids[-len(kept) :]
        assert all([await small.events(job_id, 0) is None for job_id in ids[: -len(kept)]])
        if isinstance(small, MemoryJobStore):
            assert small.finished_bytes <= 10_000
        else:
            assert redis is not None
            with redis.client() as client:
                left = {key.decode() for key in client.keys(f"{small.prefix}:job:*")}
                assert int(client.get(f"{small.prefix}:finished_bytes")) <= 10_000
            assert all(key.split(":")[2] in kept for key in left), left
    finally:
        await small.close()


async def test_released_items_are_handed_out_again_for_their_task(store: JobStore) -> None:
    summary, _ = await store.create([b"a", b"b"], task="embed")
    items = await take_all(store, 2)
    assert {item.task for item in items} == {"embed"}
    await store.release(items)
    again = await take_all(store, 2)
    assert sorted(item.data or b"" for item in again) == [b"a", b"b"]
    assert {item.task for item in again} == {"embed"}
    job = await store.get(summary["job_id"])
    assert job is not None
    assert job["task"] == "embed"


async def test_keep_alive_reports_ended_jobs(store: JobStore) -> None:
    await store.create([b"a"])
    ended, _ = await store.create([b"b"])
    items = await take_all(store, 2)
    await store.cancel(ended["job_id"])
    assert await store.keep_alive(items) == [ended["job_id"]]


async def test_the_feed_wakes_watchers_of_a_changed_job(store: JobStore) -> None:
    summary, _ = await store.create([b"a"])
    job_id = summary["job_id"]
    watch = store.feed.watch(job_id)
    try:
        item = (await take_all(store, 1))[0]
        await store.record(item, {"ok": 1}, ok=True)
        assert await store.feed.wait(watch, 5)
    finally:
        store.feed.forget(job_id, watch)
    assert len(store.feed) == 0


async def test_finished_jobs_expire_after_the_ttl(
    store: JobStore, request: pytest.FixtureRequest
) -> None:
    kind = "redis" if isinstance(store, RedisJobStore) else "memory"
    redis = request.getfixturevalue("redis_service") if kind == "redis" else None
    short = open_store(kind, redis, ttl_s=1)
    await short.start()
    try:
        summary, _ = await short.create([b"a"], idempotency_key="k")
        item = (await take_all(short, 1))[0]
        await short.record(item, {"ok": 1}, ok=True)
        assert await short.get(summary["job_id"]) is not None
        await asyncio.sleep(1.5)
        assert await short.get(summary["job_id"]) is None
        assert await short.events(summary["job_id"], 0) is None
        if isinstance(short, RedisJobStore):
            assert redis is not None
            # The next job to finish forgets the expired one in the finished-jobs index.
            later, _ = await short.create([ERROR])
            with redis.client() as client:
                left = {key.decode() for key in client.keys(f"{short.prefix}:*")}
                assert client.xlen(short.work_key) == 0
                finished = client.zrange(f"{short.prefix}:finished", 0, -1)
                assert [job_id.decode() for job_id in finished] == [later["job_id"]]
            # Only the shared work stream, counters and index stay; nothing of the job does.
            assert not any(summary["job_id"] in key for key in left), left
    finally:
        await short.close()


async def test_an_evicting_redis_is_warned_about(
    redis_service: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_service.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            store = open_store("redis", redis_service)
            await store.start()
            await store.close()
        finally:
            client.config_set("maxmemory-policy", "noeviction")
    assert "maxmemory-policy is 'allkeys-lru'" in caplog.text
    assert "noeviction" in caplog.text


async def test_kept_alive_items_stay_and_silent_ones_are_taken_over(
    redis_service: RedisServer,
) -> None:
    prefix = f"pair-{uuid.uuid4().hex[:8]}"  # two replicas of one deployment
    working, other = (open_store("redis", redis_service, prefix=prefix) for _ in range(2))
    for store in (working, other):
        await store.start()
    try:
        await working.create([b"slow"])
        (item,) = await take_all(working, 1)
        # Waiting long behind /cls traffic, but alive: claim time 0.3 s, kept for 1.2 s.
        for _ in range(12):
            await asyncio.sleep(0.1)
            assert await working.keep_alive([item]) == []
            assert await other.take(1, 0.01) == []
        # Silent from now on, as if the replica had died.
        await asyncio.sleep(0.4)
        (taken_over,) = await other.take(1, 0.5)
        assert (taken_over.index, taken_over.data, taken_over.delivery) == (0, b"slow", 2)
    finally:
        for store in (working, other):
            await store.close()


@pytest.mark.parametrize("key", [None, "retried"])
async def test_a_create_retried_after_a_stall_runs_once(
    redis_service: RedisServer, key: str | None
) -> None:
    """Redis stalls (stopped for 0.8 s, past the 0.5 s timeout) right after a job's inputs
    are written: the client retries the create script, and Redis then runs it twice."""
    store = open_store("redis", redis_service, timeout_s=0.5)
    assert isinstance(store, RedisJobStore)
    await store.start()
    process = redis_service.process
    assert process is not None
    create = store._scripts[scripts.Create]
    await store._redis.script_load(create.script)  # no NOSCRIPT round trip to count

    async def stalled(**kwargs: object) -> object:
        process.send_signal(signal.SIGSTOP)
        asyncio.get_running_loop().call_later(0.8, process.send_signal, signal.SIGCONT)
        return await create(**kwargs)

    with redis_service.client() as client:
        runs_before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    try:
        store._scripts[scripts.Create] = stalled
        summary, created = await store.create([b"one", b"two"], key, digest="d")
        store._scripts[scripts.Create] = create
        assert created
        with redis_service.client() as client:
            runs = client.info("commandstats")["cmdstat_evalsha"]["calls"] - runs_before
        assert runs == 2  # the retry happened, and both runs reached Redis
        items = await take_all(store, 2)
        assert sorted(item.data or b"" for item in items) == [b"one", b"two"]
        for item in items:
            await store.record(item, {"ok": 1}, ok=True)
        job = await store.get(summary["job_id"])
        assert job is not None
        assert job["status"] == "succeeded"
        with redis_service.client() as client:
            counters = [client.get(name) for name in store._keys[1:3]]
            assert counters == [b"0", b"0"]
            assert client.scard(store._keys[0]) == 0
    finally:
        process.send_signal(signal.SIGCONT)
        await store.close()
