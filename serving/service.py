"""One task served: its batcher, its share of the decode threads, admission, warm-up."""

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

from pydantic import BaseModel

from batching import BatcherError, DeadlineExceeded, MicroBatcher, QueueFull, RunningMean
from serving.errors import InferenceFailed, NotReady
from serving.metrics import PrometheusObserver
from serving.task import InputError, Payload, ServingOverrides, Task
from settings import Settings

logger = logging.getLogger(__name__)

# How a job item is stored: a tag byte, then the uploaded file or the JSON item. A job
# with options stores them before each item: the tag "o", the length of their JSON in 4
# bytes, the JSON, then the item as above.
_FILE, _JSON, _OPTIONS = b"f", b"j", b"o"


def pack_job_item(payload: Payload, options: dict[str, Any] | None = None) -> bytes:
    """A job item's payload, and the job's options other than the defaults, as the bytes
    a job store keeps."""
    if isinstance(payload, bytes):
        packed = _FILE + payload
    else:
        packed = _JSON + json.dumps(payload, separators=(",", ":")).encode()
    if not options:
        return packed
    text = json.dumps(options, separators=(",", ":")).encode()
    return _OPTIONS + len(text).to_bytes(4, "big") + text + packed


def unpack_job_item(data: bytes) -> tuple[Payload, dict[str, Any]]:
    """The payload and the options ``pack_job_item`` stored."""
    options: dict[str, Any] = {}
    if data[:1] == _OPTIONS:
        end = 5 + int.from_bytes(data[1:5], "big")
        options = json.loads(data[5:end])
        data = data[end:]
    if data[:1] == _JSON:
        return json.loads(data[1:]), options
    return data[1:], options


class DecodePools:
    """The threads that decode requests, shared by every task: ``interactive`` for the
    task routes, ``bulk`` (one thread) for job items, so uploads never queue behind a job."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.interactive = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self.bulk = ThreadPoolExecutor(1, thread_name_prefix="decode-bulk")

    def shutdown(self) -> None:
        for pool in (self.interactive, self.bulk):
            pool.shutdown(wait=False, cancel_futures=True)


class Duration:
    """How many times something happened, and its seconds in all."""

    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds


class RequestStats:
    """Requests answered and failed, and the time spent decoding their inputs and encoding
    their answers, for the Open Inference Protocol's statistics. On the event loop only."""

    def __init__(self) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.decode = Duration()
        self.encode = Duration()


class TaskService:
    """Serves one loaded task: decodes in the shared pools, batches, answers by the
    deadline. Refuses up front what it could not answer in time."""

    def __init__(
        self,
        task: Task[Any, Any],
        settings: Settings,
        pools: DecodePools,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.task = task
        self.name = task.name
        self.version = task.version
        self.settings = settings = with_overrides(settings, task.serving_overrides())
        self.pools = pools
        self.warmed_up = asyncio.Event()
        self.warmup_report: dict[str, Any] = {}
        self.default_options = task.Options()
        self._decoding = 0
        self._decoding_interactive = 0
        self._decode_seconds = RunningMean()
        self.decode_rejected_full = 0
        self.requests = RequestStats()
        self._leases = 0
        self._released: asyncio.Event | None = None
        self.tensor_form = task.tensor_form()
        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(
            task.predict_batch,
            max_batch_size=settings.batch_size_ceiling,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            name=task.name,
            observer=PrometheusObserver(task.name, task.version),
            priorities=2,
            shed_late=settings.shed_late_requests,
            min_share=settings.job_min_share,
            concurrency=task.concurrency(),
            on_crash=on_crash,
        )

    @contextmanager
    def lease(self) -> Iterator["TaskService"]:
        """This service, held for one request or job item until it ends: a service being
        retired waits for every lease to end before it stops its batcher."""
        self._leases += 1
        try:
            yield self
        finally:
            self._leases -= 1
            if not self._leases and self._released is not None:
                self._released.set()

    async def retire(self, drain_timeout: float) -> None:
        """Stops this service once the requests holding it are answered, within
        ``drain_timeout``: no lease is taken any more (the engine no longer finds it),
        and what is queued is computed before its batcher stops."""
        loop = asyncio.get_running_loop()
        until = loop.time() + drain_timeout
        if self._leases:
            self._released = asyncio.Event()
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._released.wait()
            except TimeoutError:
                logger.warning(
                    "%s: %d requests still held it after the drain", self.name, self._leases
                )
        await self.batcher.stop(max(0.0, until - loop.time()))

    async def warm_up(self) -> None:
        settings = self.settings
        tune = settings.max_batch_size == "auto"
        report = await asyncio.to_thread(self.task.warm_up, settings.batch_size_ceiling, tune)
        self.warmup_report = report
        logger.info("%s: warm-up done: %s", self.name, report)
        if "batch_size" in report:
            self.batcher.max_batch_size = report["batch_size"]
        if "seconds_per_item" in report:
            # Shedding works from the first request, not only after the first batch.
            self.batcher.expect_seconds_per_item(report["seconds_per_item"])
        if "decode_seconds_per_item" in report and self._decode_seconds.value is None:
            # A flood that arrives before the first decode ends is judged with it.
            self._decode_seconds.add(report["decode_seconds_per_item"])
        self.warmed_up.set()

    def require_warm(self) -> None:
        if not self.warmed_up.is_set():
            raise NotReady(f"the {self.name} model is loading and warming up")

    def admit(self, arrived_at: float | None = None) -> None:
        """Raises NotReady or QueueFull if a request that arrived at ``arrived_at`` (the
        loop's clock; default now) could not be served within TIMEOUT of it."""
        self.require_warm()
        self._admit(self._deadline(arrived_at))

    def _deadline(self, arrived_at: float | None, within: float | None = None) -> float:
        loop = asyncio.get_running_loop()
        if within is None or within > self.settings.timeout:
            within = self.settings.timeout
        return (loop.time() if arrived_at is None else arrived_at) + within

    def _admit(self, deadline: float | None) -> None:
        """Refuses a request that could not be decoded and computed by ``deadline``. Its
        decode takes one thread its whole decode time after the backlog ahead of it, and
        the model meanwhile computes the items ahead, those being decoded now included:
        the two waits overlap, and the longer one counts."""
        if deadline is None:
            return
        decoding = self._decoding_interactive
        decode_wait = 0.0
        if (per_item := self._decode_seconds.value) is not None:
            decode_wait = (decoding / self.pools.workers + 1) * per_item
        self.batcher.admit(deadline, coming=decoding, ready_in=decode_wait)

    async def run(
        self,
        payload: Payload,
        options: BaseModel,
        *,
        bulk: bool = False,
        within: float | None = None,
        background: bool = False,
    ) -> Any:
        """Decodes ``payload`` and computes it within TIMEOUT seconds from now (for a
        request, the end of its body), or ``within`` seconds if that is shorter.

        ``bulk`` items (job work) have no deadline and only fill the capacity that
        interactive requests leave; ``background`` requests keep their deadline but
        queue behind interactive ones, as job work does.
        """
        self.require_warm()
        deadline = None if bulk else self._deadline(None, within)
        self._admit(deadline)  # before decoding an input the model could not serve in time
        item = await self._decode(payload, options, deadline, bulk)
        try:
            return await self.batcher.submit(
                item, deadline=deadline, priority=1 if bulk or background else 0, admitted=True
            )
        except BatcherError:
            raise
        except Exception as exc:
            if isinstance(exc, InputError):
                raise  # fails this item only, with its status
            raise InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}") from exc

    async def run_job_item(self, data: bytes) -> Any:
        """Computes one stored job item, with its job's options."""
        payload, stored = unpack_job_item(data)
        options = self.task.Options.model_validate(stored) if stored else self.default_options
        result = await self.run(payload, options, bulk=True)
        return _jsonable(self.task.encode(result, options))

    async def _decode(
        self, payload: Payload, options: BaseModel, deadline: float | None, bulk: bool
    ) -> Any:
        # Job items are bounded by JOB_CONCURRENCY, not by the interactive backlog: a
        # burst of uploads must not fail them.
        if not bulk and self._decoding_interactive >= self.settings.max_queue_size:
            self.decode_rejected_full += 1
            raise QueueFull("too many requests are waiting to be decoded")
        interactive = 0 if bulk else 1
        self._decoding += 1
        self._decoding_interactive += interactive

        def finished(done: "asyncio.Future[tuple[Any, float]]") -> None:
            # When the thread is done, not when the caller stops waiting: a decode that
            # timed out still occupies its thread until it ends.
            self._decoding -= 1
            self._decoding_interactive -= interactive
            if not done.cancelled():
                done.exception()  # retrieved, when nobody awaits it any more

        decode = partial(self._timed_decode, payload, options)
        pool = self.pools.bulk if bulk else self.pools.interactive
        pending = asyncio.get_running_loop().run_in_executor(pool, decode)
        pending.add_done_callback(finished)
        try:
            async with asyncio.timeout_at(deadline):
                item, seconds = await asyncio.shield(pending)
        except TimeoutError:
            raise DeadlineExceeded("timed out while decoding the input") from None
        self._decode_seconds.add(seconds)
        self.requests.decode.add(seconds)
        return item

    def _timed_decode(self, payload: Payload, options: BaseModel) -> tuple[Any, float]:
        started = time.perf_counter()
        item = self.task.decode(payload, options)
        return item, time.perf_counter() - started

    def metadata(self) -> dict[str, Any]:
        settings = self.settings
        batcher = self.batcher
        return {
            "model": {"warmup": self.warmup_report, **self.task.describe()},
            "settings": self.task.settings.model_dump(mode="json"),
            "ready": self.warmed_up.is_set(),
            "batching": {
                "max_batch_size": batcher.max_batch_size,
                "max_batch_size_setting": settings.max_batch_size,
                "max_batch_delay_ms": settings.max_batch_delay_ms,
                "max_queue_size": settings.max_queue_size,
                "timeout": settings.timeout,
            },
            "stats": batcher.stats.as_dict(batcher.queue_depth),
            "decode": {
                "workers": self.pools.workers,
                "in_flight": self._decoding,
                "rejected_full": self.decode_rejected_full,
            },
        }


def with_overrides(settings: Settings, overrides: ServingOverrides) -> Settings:
    """The server's settings as one task sees them, with the task's own limits."""
    update: dict[str, Any] = {
        key: value
        for key in ("max_batch_delay_ms", "timeout", "max_queue_size")
        if (value := getattr(overrides, key)) is not None
    }
    if (cap := overrides.max_batch_size) is not None:
        if settings.max_batch_size == "auto":
            update["max_batch_size_limit"] = min(settings.max_batch_size_limit, cap)
        else:
            update["max_batch_size"] = min(settings.max_batch_size, cap)
    return settings.model_copy(update=update) if update else settings


def _jsonable(answer: Any) -> Any:
    return answer.model_dump() if isinstance(answer, BaseModel) else answer
