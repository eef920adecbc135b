"""The runner's side of the Redis job store: taking items to compute (new ones, and those
a stopped replica left pending), beginning them, recording results, handing items back."""

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from jobs import scripts
from jobs.models import LIVE_STATUSES, ItemResult, WorkItem, now_iso
from jobs.redis_base import GROUP, RUNNING_CACHE, RedisBase, text, unavailable

logger = logging.getLogger(__name__)


class RedisWork(RedisBase):
    @unavailable
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
                    WorkItem(text(job_id), int(index), data, 1, text(entry_id), text(task))
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
            pipe.hget(f"{self._job_key(text(fields[b'job']))}:data", fields[b"index"])
        images = await pipe.execute()
        return [
            WorkItem(
                text(fields[b"job"]),
                int(fields[b"index"]),
                data,
                delivery,
                text(entry_id),
                text(fields.get(b"task", b"")),
            )
            for (entry_id, fields, delivery), data in zip(entries, images, strict=True)
        ]

    async def _reclaim(self, count: int) -> list[tuple[Any, Any, int]]:
        stale = await self._redis.xpending_range(
            self.work_key, GROUP, min="-", max="+", count=count, idle=self.claim_idle_ms
        )
        if not stale:
            return []
        deliveries = {text(p["message_id"]): int(p["times_delivered"]) for p in stale}
        claimed = await self._redis.xclaim(
            self.work_key, GROUP, self.consumer, self.claim_idle_ms, list(deliveries)
        )
        if claimed:
            logger.warning("took over %d job items from a replica that stopped", len(claimed))
        return [
            (entry_id, fields, deliveries[text(entry_id)] + 1)
            for entry_id, fields in claimed
            if fields  # an entry deleted meanwhile comes back empty
        ]

    @unavailable
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
            if len(self._running) > RUNNING_CACHE:
                self._running.popitem(last=False)
        return live

    @unavailable
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

    @unavailable
    async def discard(self, item: WorkItem) -> None:
        await (
            self._redis.pipeline(transaction=True)
            .xack(self.work_key, GROUP, item.handle)
            .xdel(self.work_key, item.handle)
            .execute()
        )

    @unavailable
    async def release(self, items: Sequence[WorkItem]) -> None:
        if items:
            tail = [
                part for item in items for part in (item.handle, item.job_id, item.index, item.task)
            ]
            await self._run(scripts.Release(GROUP, tail))

    @unavailable
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
            if status is None or text(status) not in LIVE_STATUSES
        ]
        for job_id in ended:
            self._running.pop(job_id, None)
        return ended
