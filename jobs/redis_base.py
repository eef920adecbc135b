"""What the Redis job store's two sides share: the clients, the keys, the Lua scripts,
and the listener that hears every replica's changes and cancellations.

Work items travel through one Redis Stream read by a consumer group, so each item goes
to one replica at a time and stays pending until that replica records its result. An
item whose replica stopped answering is claimed by another after ``claim_idle_s``.
Results, counts and events change only inside Lua scripts (jobs/scripts.py), so a
redelivered item is never counted twice. Needs the Redis 7.0 (Valkey 7.2) command set,
not Redis Cluster.
"""

import asyncio
import functools
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError, ResponseError

from jobs import scripts
from jobs.store import (
    JOB_KEPT_BYTES,
    CancelCallback,
    ChangeFeed,
    Reading,
    StoreLimits,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

GROUP = "replicas"
# Jobs remembered as running, at most: their items begin without a round trip.
RUNNING_CACHE = 1024
# A job's inputs, up to MAX_JOB_BYTES, are written with a longer timeout than the
# commands that move only counts and ids.
_BULK_TIMEOUT_S = 10.0

P = ParamSpec("P")
T = TypeVar("T")


def unavailable(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """``method``, raising StoreUnavailable where Redis fails it."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except RedisError as exc:
            raise StoreUnavailable(f"the job store (Redis) is unavailable: {exc}") from exc

    return wrapper


def client(url: str, timeout: float | None) -> Any:
    """A client; typed Any, since redis-py's hints do not follow pipelines and replies."""
    # One quick retry on a fresh connection covers a pool that went stale while Redis
    # restarted; a Redis that is really down fails within about 2 x timeout.
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout or 2.0,
        retry=Retry(NoBackoff(), 1),
    )


def text(value: bytes | str) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value


class RedisBase:
    """The connection to Redis that both sides of the job store use."""

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
        self._redis = client(url, timeout_s)
        self._bulk = client(url, max(_BULK_TIMEOUT_S, 10 * timeout_s))
        # Blocking reads and the subscription wait longer than a request may.
        self._blocking = client(url, timeout_s + 2.0)
        self._listener_client = client(url, None)
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

    async def _run(self, script: scripts.Script) -> Any:
        return await self._scripts[type(script)](keys=self._keys, args=script.args())

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self.work_key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def on_cancel(self, callback: CancelCallback) -> None:
        self._cancel_callbacks.append(callback)

    async def _listen(self) -> None:
        """Follows job changes and cancellations published by every replica, for good.
        A lost subscription is tried again at once, then after 0.1, 0.2, ... 2 s (redis-py's
        Retry); after an outage every watcher is woken to read the state again."""
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), -1, (RedisError,))
        while True:
            await retry.call_with_retry(self._follow, self._lost)

    async def _lost(self, error: Exception) -> None:
        logger.debug("job store listener cannot reach Redis (%s); retrying", error)

    async def _follow(self) -> None:
        """Subscribes, then passes messages on until the connection is lost: returns then,
        so that the retry's backoff starts afresh."""
        changed, cancelled = f"{self.prefix}:changed", f"{self.prefix}:cancelled"
        async with self._listener_client.pubsub() as pubsub:
            await pubsub.subscribe(changed, cancelled)
            self.feed.notify_all()
            try:
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None:
                        continue
                    job_id = text(message["data"])
                    if text(message["channel"]) == cancelled:
                        self._running.pop(job_id, None)
                        for callback in self._cancel_callbacks:
                            callback(job_id)
                    self.feed.notify(job_id)
            except RedisError as exc:
                logger.debug("job store listener lost Redis (%s); reconnecting", exc)
