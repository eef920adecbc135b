"""Jobs in Redis: shared by every worker and replica, and kept across restarts. This is the
API's side (creating, reading, cancelling jobs); the runner's side is jobs/redis_work.py
and what both share is jobs/redis_base.py.
"""

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from redis.exceptions import RedisError, ResponseError

from jobs import scripts
from jobs.models import ItemResult, JobEvent, JobStatus, now_iso
from jobs.redis_base import text, unavailable
from jobs.redis_work import RedisWork
from jobs.store import IdempotencyConflict, StoreUnavailable, scoped_key

logger = logging.getLogger(__name__)

# Images written before the job exists expire by themselves if the writer dies.
_UNCLAIMED_DATA_TTL_S = 600


class RedisJobStore(RedisWork):
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

    async def _check_eviction_policy(self) -> None:
        try:
            policy = text((await self._redis.config_get("maxmemory-policy"))["maxmemory-policy"])
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
        with self.reading.hold(self.limits, live, items, queued, nbytes):
            yield

    @unavailable
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

    @unavailable
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
        reply = [text(v) for v in await self._run(create)]
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

    @unavailable
    async def get(self, job_id: str) -> dict[str, Any] | None:
        key = self._job_key(job_id)
        fields, results = await (
            self._redis.pipeline(transaction=True).hgetall(key).hgetall(f"{key}:results").execute()
        )
        if not fields:
            return None
        job = {text(k): text(v) for k, v in fields.items()}
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

    @unavailable
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
                int(text(entry_id).split("-")[1]),
                text(fields[b"kind"]),
                json.loads(fields[b"data"]),
            )
            for entry_id, fields in entries
        ]

    async def cancel(self, job_id: str) -> JobStatus | None:
        return await self._end(job_id, scripts.Cancel)

    async def remove(self, job_id: str) -> JobStatus | None:
        return await self._end(job_id, scripts.Remove)

    @unavailable
    async def _end(self, job_id: str, script: type[scripts.Cancel]) -> JobStatus | None:
        """Runs the cancel or remove script, which ends the job if it is live."""
        self._running.pop(job_id, None)
        status = await self._run(script(self.prefix, job_id, now_iso(), self.ttl_s))
        return JobStatus(text(status)) if status else None
