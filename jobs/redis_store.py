"""Jobs in Redis: shared by every worker and replica, and kept across restarts.

Work items travel through one Redis Stream read by a consumer group, so each item goes
to one replica at a time and stays pending until that replica records its result. An
item whose replica stopped answering is claimed by another after ``claim_idle_s``.
Results, counts and events change only inside Lua scripts, so a redelivered item is
never counted twice. Needs the Redis 7.0 (Valkey 7.2) command set, not Redis Cluster.
"""

import asyncio
import functools
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from jobs import scripts
from jobs.models import LIVE_STATUSES, ItemResult, JobEvent, JobStatus, WorkItem, now_iso
from jobs.store import (
    JOB_KEPT_BYTES,
    CancelCallback,
    ChangeFeed,
    IdempotencyConflict,
    Reading,
    StoreLimits,
    StoreUnavailable,
    scoped_key,
)

logger = logging.getLogger(__name__)

GROUP = "replicas"
# Images written before the job exists expire by themselves if the writer dies.
_UNCLAIMED_DATA_TTL_S = 600
_RUNNING_CACHE = 1024
# A job's inputs, up to MAX_JOB_BYTES, are written with a longer timeout than the
# commands that move only counts and ids.
_BULK_TIMEOUT_S = 10.0

P = ParamSpec("P")
T = TypeVar("T")


def _unavailable(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except RedisError as exc:
            raise StoreUnavailable(f"the job store (Redis) is unavailable: {exc}") from exc

    return wrapper


def _client(url: str, timeout: float | None) -> Any:
    """A client; typed Any, since redis-py's hints do not follow pipelines and replies."""
    # One quick retry on a fresh connection covers a pool that went stale while Redis
    # restarted; a Redis that is really down fails within about 2 x timeout.
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout or 2.0,
        retry=Retry(NoBackoff(), 1),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisJobStore:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        limits: StoreLimits,
        ttl_s: float,
        timeout_s: float,
        claim_idle_s: float,
    ) -> None:
        self.prefix = prefix
        self.limits = limits
        self.ttl_s = max(1, round(ttl_s))
        self.claim_idle_ms = round(claim_idle_s * 1000)
        self.feed = ChangeFeed()
        self.reading = Reading()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._redis = _client(url, timeout_s)
        self._bulk = _client(url, max(_BULK_TIMEOUT_S, 10 * timeout_s))
        # Blocking reads and the subscription wait longer than a request may.
        self._blocking = _client(url, timeout_s + 2.0)
        self._listener_client = _client(url, None)
        shared = ["live", "queued_items", "queued_bytes", "work"]
        shared += ["finished", "finished_sizes", "finished_bytes"]
        self._keys = [f"{prefix}:{name}" for name in shared]
        self._scripts = {
            script: self._redis.register_script(
                scripts.source(script, limits.max_finished_bytes, JOB_KEPT_BYTES)
            )
            for script in scripts.SCRIPTS
        }
        self._cancel_callbacks: list[CancelCallback] = []
        # Jobs recently seen running: their items begin without a round trip.
        self._running: OrderedDict[str, None] = OrderedDict()
        self._listener: asyncio.Task[None] | None = None
        self._next_reclaim = 0.0

    @property
    def work_key(self) -> str:
        return f"{self.prefix}:work"

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    async def start(self) -> None:
        try:
            await self._ensure_group()
            await self._check_eviction_policy()
        except RedisError as exc:
            logger.warning("Redis is not reachable yet (%s); jobs answer 503 until it is", exc)
        self._listener = asyncio.create_task(self._listen(), name="job-store-listener")

    async def close(self) -> None:
        self.feed.close()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait([self._listener])
        for client in (self._redis, self._bulk, self._blocking, self._listener_client):
            await client.aclose()

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self.work_key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _check_eviction_policy(self) -> None:
        try:
            policy = _text((await self._redis.config_get("maxmemory-policy"))["maxmemory-policy"])
        except (ResponseError, KeyError):
            return  # managed services may refuse CONFIG
        if policy != "noeviction":
            logger.warning(
                "Redis maxmemory-policy is %r: when Redis fills up it may silently evict jobs"
                " and their queued images; set maxmemory-policy noeviction",
                policy,
            )

    @asynccontextmanager
    async def admit(self, nbytes: int) -> AsyncIterator[None]:
        """Room is held in this process only: bodies read by other workers count once
        their jobs exist, and create.lua has the last word."""
        live, items, queued, _ = await self._counts()
        self.reading.check(self.limits, live, items, queued, nbytes)
        with self.reading.hold(nbytes):
            yield

    @_unavailable
    async def _counts(self, idem: str = "") -> tuple[int, int, int, bool]:
        """Live jobs, queued images and their bytes, and whether ``idem`` (an
        idempotency key's Redis key) names a job already made."""
        pipeline = self._redis.pipeline(transaction=False)
        pipeline.scard(self._keys[0]).get(self._keys[1]).get(self._keys[2])
        if idem:
            pipeline.exists(idem)
        live, items, queued, *replay = await pipeline.execute()
        return live, int(items or 0), int(queued or 0), bool(replay and replay[0])

    async def _check_room(self, new_items: int, new_bytes: int, idem: str = "") -> None:
        """Raises StoreFull if a job of ``new_items`` images, ``new_bytes`` in all, would
        not fit now, unless ``idem`` names a job already made, whose replay needs no
        room. create.lua decides for good; this spares writing the images of a job it
        would refuse."""
        live, items, queued, replay = await self._counts(idem)
        if not replay:
            self.limits.check(live, items, queued, new_items, new_bytes)

    @_unavailable
    async def create(
        self,
        items: Sequence[bytes | ItemResult],
        idempotency_key: str | None = None,
        task: str = "",
        digest: str = "",
    ) -> tuple[dict[str, Any], bool]:
        job_id = uuid.uuid4().hex
        images = {i: item for i, item in enumerate(items) if isinstance(item, bytes)}
        errors = [
            part
            for i, item in enumerate(items)
            if not isinstance(item, bytes)
            for part in (str(i), json.dumps(item))
        ]
        idem = ""
        if idempotency_key is not None:
            hashed = hashlib.sha256(scoped_key(task, idempotency_key).encode()).hexdigest()
            idem = f"{self.prefix}:idempotency:{hashed}"
        nbytes = sum(len(data) for data in images.values())
        if images:
            await self._check_room(len(images), nbytes, idem)  # before writing them
            data_key = f"{self._job_key(job_id)}:data"
            await (
                self._bulk.pipeline(transaction=True)
                .hset(data_key, mapping=images)
                .expire(data_key, _UNCLAIMED_DATA_TTL_S)
                .execute()
            )
        create = scripts.Create(
            prefix=self.prefix,
            id=job_id,
            total=len(items),
            now=now_iso(),
            max_jobs=self.limits.max_jobs,
            max_items=self.limits.max_items,
            max_bytes=self.limits.max_bytes,
            ttl=self.ttl_s,
            idem=idem,
            nbytes=nbytes,
            task=task,
            digest=digest,
            nimages=len(images),
            tail=[*images, *errors],
        )
        reply = [_text(v) for v in await self._run(create)]
        if reply[0] == "full":
            live, queued_items, queued_bytes = map(int, reply[1:])
            self.limits.check(live, queued_items, queued_bytes, len(images), nbytes)
            raise AssertionError(f"the create script refused a job that fits: {reply}")
        if reply[0] == "conflict":
            raise IdempotencyConflict(reply[1])
        if reply[0] == "lost":
            raise StoreUnavailable(
                "the job store was too slow to answer and dropped this job's images"
            )
        summary = {"job_id": reply[1], "status": reply[2], "total": int(reply[3])}
        return summary, reply[0] == "created"

    @_unavailable
    async def get(self, job_id: str) -> dict[str, Any] | None:
        key = self._job_key(job_id)
        fields, results = await (
            self._redis.pipeline(transaction=True).hgetall(key).hgetall(f"{key}:results").execute()
        )
        if not fields:
            return None
        job = {_text(k): _text(v) for k, v in fields.items()}
        total = int(job["total"])
        ordered: list[Any] = [None] * total
        for index, result in results.items():
            ordered[int(index)] = json.loads(result)
        return {
            "job_id": job_id,
            "task": job.get("task", ""),
            "status": job["status"],
            "progress": {"done": int(job["done"]), "failed": int(job["failed"]), "total": total},
            "created_at": job["created_at"],
            "started_at": job.get("started_at"),
            "finished_at": job.get("finished_at"),
            "results": ordered,
        }

    @_unavailable
    async def events(self, job_id: str, after: int) -> list[JobEvent] | None:
        key = self._job_key(job_id)
        exists, entries = await (
            self._redis.pipeline(transaction=True)
            .exists(key)
            .xrange(f"{key}:events", min=f"({0}-{max(after, 0)}")
            .execute()
        )
        if not exists:
            return None
        return [
            JobEvent(
                int(_text(entry_id).split("-")[1]),
                _text(fields[b"kind"]),
                json.loads(fields[b"data"]),
            )
            for entry_id, fields in entries
        ]

    async def cancel(self, job_id: str) -> JobStatus | None:
        return await self._end(job_id, scripts.Cancel)

    async def remove(self, job_id: str) -> JobStatus | None:
        return await self._end(job_id, scripts.Remove)

    @_unavailable
    async def _end(self, job_id: str, script: type[scripts.Cancel]) -> JobStatus | None:
        """Runs the cancel or remove script, which ends the job if it is live."""
        self._running.pop(job_id, None)
        status = await self._run(script(self.prefix, job_id, now_iso(), self.ttl_s))
        return JobStatus(_text(status)) if status else None

    async def _run(self, script: scripts.Script) -> Any:
        return await self._scripts[type(script)](keys=self._keys, args=script.args())

    @_unavailable
    async def take(self, count: int, wait_s: float) -> list[WorkItem]:
        """Claims items idle past ``claim_idle_s`` first (their replica died), then reads
        new ones, waiting only when there are none."""
        try:
            taken: list[WorkItem] = []
            if time.monotonic() >= self._next_reclaim:
                self._next_reclaim = time.monotonic() + self.claim_idle_ms / 4000
                taken += await self._with_images(await self._reclaim(count))
            if len(taken) < count:
                take = scripts.Take(self.prefix, GROUP, self.consumer, count - len(taken))
                rows = await self._run(take)
                taken += [
                    WorkItem(_text(job_id), int(index), data, 1, _text(entry_id), _text(task))
                    for entry_id, job_id, index, task, data in rows
                ]
            if not taken:
                reply = await self._blocking.xreadgroup(
                    GROUP,
                    self.consumer,
                    {self.work_key: ">"},
                    count=count,
                    block=max(1, round(wait_s * 1000)),
                )
                entries = reply[0][1] if reply else []
                taken += await self._with_images([(i, fields, 1) for i, fields in entries])
            return taken
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group()  # Redis lost the group: it restarted empty
            return []

    async def _with_images(self, entries: list[tuple[Any, Any, int]]) -> list[WorkItem]:
        if not entries:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for _entry_id, fields, _delivery in entries:
            pipe.hget(f"{self._job_key(_text(fields[b'job']))}:data", fields[b"index"])
        images = await pipe.execute()
        return [
            WorkItem(
                _text(fields[b"job"]),
                int(fields[b"index"]),
                data,
                delivery,
                _text(entry_id),
                _text(fields.get(b"task", b"")),
            )
            for (entry_id, fields, delivery), data in zip(entries, images, strict=True)
        ]

    async def _reclaim(self, count: int) -> list[tuple[Any, Any, int]]:
        stale = await self._redis.xpending_range(
            self.work_key, GROUP, min="-", max="+", count=count, idle=self.claim_idle_ms
        )
        if not stale:
            return []
        deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in stale}
        claimed = await self._redis.xclaim(
            self.work_key, GROUP, self.consumer, self.claim_idle_ms, list(deliveries)
        )
        if claimed:
            logger.warning("took over %d job items from a replica that stopped", len(claimed))
        return [
            (entry_id, fields, deliveries[_text(entry_id)] + 1)
            for entry_id, fields in claimed
            if fields  # an entry deleted meanwhile comes back empty
        ]

    @_unavailable
    async def begin(self, item: WorkItem) -> bool:
        """A job seen running needs no round trip: its cancellation reaches this replica
        through ``on_cancel`` (or ``keep_alive``), and a result recorded for a job that
        ended meanwhile is dropped by the record script."""
        if item.job_id in self._running:
            self._running.move_to_end(item.job_id)
            return True
        live = bool(await self._run(scripts.Begin(self.prefix, item.job_id, now_iso())))
        if live:
            self._running[item.job_id] = None
            if len(self._running) > _RUNNING_CACHE:
                self._running.popitem(last=False)
        return live

    @_unavailable
    async def record(self, item: WorkItem, result: ItemResult, *, ok: bool) -> None:
        await self._run(
            scripts.Record(
                prefix=self.prefix,
                id=item.job_id,
                index=item.index,
                result=json.dumps(result),
                ok=int(ok),
                now=now_iso(),
                ttl=self.ttl_s,
                entry=item.handle,
                group=GROUP,
            )
        )

    @_unavailable
    async def discard(self, item: WorkItem) -> None:
        await (
            self._redis.pipeline(transaction=True)
            .xack(self.work_key, GROUP, item.handle)
            .xdel(self.work_key, item.handle)
            .execute()
        )

    @_unavailable
    async def release(self, items: Sequence[WorkItem]) -> None:
        if items:
            tail = [
                part for item in items for part in (item.handle, item.job_id, item.index, item.task)
            ]
            await self._run(scripts.Release(GROUP, tail))

    @_unavailable
    async def keep_alive(self, items: Sequence[WorkItem]) -> list[str]:
        if not items:
            return []
        job_ids = sorted({item.job_id for item in items})
        pipe = self._redis.pipeline(transaction=False)
        pipe.xclaim(
            self.work_key, GROUP, self.consumer, 0, [item.handle for item in items], justid=True
        )
        for job_id in job_ids:
            pipe.hget(self._job_key(job_id), "status")
        _claimed, *statuses = await pipe.execute()
        ended = [
            job_id
            for job_id, status in zip(job_ids, statuses, strict=True)
            if status is None or _text(status) not in LIVE_STATUSES
        ]
        for job_id in ended:
            self._running.pop(job_id, None)
        return ended

    def on_cancel(self, callback: CancelCallback) -> None:
        self._cancel_callbacks.append(callback)

    async def _listen(self) -> None:
        """Follows job changes and cancellations published by every replica; after an
        outage every watcher is woken to read the state again."""
        changed, cancelled = f"{self.prefix}:changed", f"{self.prefix}:cancelled"
        backoff = 0.1
        while True:
            try:
                async with self._listener_client.pubsub() as pubsub:
                    await pubsub.subscribe(changed, cancelled)
                    self.feed.notify_all()
                    backoff = 0.1
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=5.0
                        )
                        if message is None:
                            continue
                        job_id = _text(message["data"])
                        if _text(message["channel"]) == cancelled:
                            self._running.pop(job_id, None)
                            for callback in self._cancel_callbacks:
                                callback(job_id)
                        self.feed.notify(job_id)
            except RedisError as exc:
                logger.debug("job store listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
