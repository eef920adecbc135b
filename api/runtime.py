"""What one server process runs: the model, its batcher and the decode pool."""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from api.errors import describe
from api.exceptions import InferenceFailed, NotReady
from api.metrics import PrometheusObserver
from api.schemas import Classification
from batching import (
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    MicroBatcher,
    QueueFull,
    RunningMean,
)
from classification import Classifier, ClassifyInput, ClassScore, load_model
from jobs import HandBack, JobRunner, JobStore, MemoryJobStore, RedisJobStore, StoreLimits
from settings import Settings

logger = logging.getLogger(__name__)


def open_job_store(settings: Settings) -> JobStore:
    """The store JOB_STORE names, with the limits that hold across all replicas."""
    limits = StoreLimits(
        settings.max_jobs, settings.max_queued_job_items, settings.max_queued_job_bytes
    )
    if settings.job_store == "redis":
        return RedisJobStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            limits=limits,
            ttl_s=settings.job_ttl_s,
            timeout_s=settings.redis_timeout_s,
            claim_idle_s=settings.job_claim_idle_s,
        )
    return MemoryJobStore(limits=limits, ttl_s=settings.job_ttl_s)


class Runtime:
    """Owns the model, the batcher and the decode pool for the life of the app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.classifier: Classifier | None = None
        self.batcher: MicroBatcher[ClassifyInput, list[ClassScore]] | None = None
        self.warmed_up = asyncio.Event()
        self.stopping = asyncio.Event()
        self.warmup_error: str | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.decode_workers = settings.decode_workers  # resolved once the device is known
        self._bulk_decode_pool: ThreadPoolExecutor | None = None
        self._decoding = 0
        self._decoding_interactive = 0
        self._decode_seconds = RunningMean()
        self.decode_rejected_full = 0
        self._warmup_task: asyncio.Task[None] | None = None
        self.job_store = open_job_store(settings)
        self.jobs_disabled = settings.jobs_disabled_reason
        self.jobs = JobRunner(
            self.job_store,
            self._classify_job_item,
            describe,
            concurrency=settings.job_concurrency or 4,
            max_deliveries=settings.job_max_deliveries,
            keep_alive_s=settings.job_claim_idle_s / 3,
        )

    async def start(self) -> None:
        """Loads the model, starts the batcher, and warms up in the background.

        Raises ValueError naming the setting when the model cannot be loaded.
        """
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        torch.set_num_threads(settings.intra_op_threads)
        model = await asyncio.to_thread(load_model, settings.model, settings.weights)
        self.classifier = await asyncio.to_thread(
            Classifier,
            model,
            device=settings.device,
            channels_last=settings.channels_last,
            backend=settings.backend,
            dtype=settings.dtype,
            cache_dir=settings.model_cache_dir,
            threads=settings.intra_op_threads,
        )
        if not settings.job_concurrency and self.classifier.device.type == "cuda":
            # A GPU batch costs little more than one item: let job items fill big batches.
            self.jobs.concurrency = 2 * settings.batch_size_ceiling
        self.decode_workers = settings.decode_threads(self.classifier.device.type)
        self._decode_pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode")
        # Job images get one thread of their own, so /cls uploads never queue behind them.
        self._bulk_decode_pool = ThreadPoolExecutor(1, thread_name_prefix="decode-bulk")
        self.batcher = MicroBatcher(
            self.classifier.predict,
            max_batch_size=settings.batch_size_ceiling,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            name="classifier",
            observer=PrometheusObserver(),
            priorities=2,
            shed_late=settings.shed_late_requests,
            min_share=settings.job_min_share,
        )
        self.batcher.start()
        if self.jobs_disabled:
            logger.warning("%s", self.jobs_disabled)
        else:
            await self.job_store.start()
        self._warmup_task = asyncio.create_task(self._warm_up(), name="warmup")
        self._warmup_task.add_done_callback(self._on_warmup_done)

    async def _warm_up(self) -> None:
        assert self.classifier is not None
        settings = self.settings
        report = await asyncio.to_thread(
            self.classifier.warmup,
            settings.batch_size_ceiling,
            tune=settings.max_batch_size == "auto",
        )
        assert self.batcher is not None
        self.batcher.max_batch_size = report["batch_size"]
        # Shedding works from the first request, not only after the first batch.
        self.batcher.expect_seconds_per_item(report["seconds_per_item"])
        self.warmed_up.set()
        if not self.jobs_disabled and not self.stopping.is_set():
            self.jobs.start()

    def _on_warmup_done(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self.warmup_error = f"{type(error).__name__}: {error}"
            logger.error("warm-up failed; the server stays unready", exc_info=error)

    def begin_shutdown(self) -> None:
        """Turns readiness off so load balancers move away, ends event streams and takes
        no more job items; requests in flight, or arriving on connections already open,
        are still served until ``stop``. Safe to call from a signal handler."""
        self._loop.call_soon_threadsafe(self._stop_taking_work)

    def _stop_taking_work(self) -> None:
        self.stopping.set()
        self.job_store.feed.close()
        self.jobs.stop_taking()

    async def stop(self) -> None:
        """Refuses new work; finishes or hands back job items and drains the batcher,
        together within DRAIN_TIMEOUT; frees threads. Jobs are never cancelled."""
        self._stop_taking_work()
        drain_until = self._loop.time() + self.settings.drain_timeout
        await self.jobs.stop(self.settings.drain_timeout / 2)
        await self.job_store.close()
        if self._warmup_task is not None and not self._warmup_task.done():
            self._warmup_task.cancel()
            await asyncio.wait([self._warmup_task])
        if self.batcher is not None:
            await self.batcher.stop(max(0.0, drain_until - self._loop.time()))
        for pool in (self._decode_pool, self._bulk_decode_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> str | None:
        """None when ready, otherwise why not."""
        if self.stopping.is_set():
            return "the server is shutting down"
        if self.warmup_error:
            return f"warm-up failed ({self.warmup_error}); see the server log"
        if not self.warmed_up.is_set():
            return "the model is loading and warming up"
        return None

    def require_warm(self) -> None:
        """Raises NotReady until the model is loaded and warm."""
        if not self.warmed_up.is_set():
            raise NotReady(self.readiness() or "not ready")

    def admit(self) -> None:
        """Raises NotReady or QueueFull if a /cls request arriving now would not be served."""
        self.require_warm()
        self._admit(asyncio.get_running_loop().time() + self.settings.timeout)

    def _admit(self, deadline: float | None) -> None:
        """Refuses a request whose image could not be decoded and computed by ``deadline``:
        the wait for the decode threads counts as much as the wait for the model, and the
        images being decoded now will reach the model first."""
        assert self.batcher is not None
        if deadline is None:
            return
        decoding = self._decoding_interactive
        decode_wait = 0.0
        if (per_image := self._decode_seconds.value) is not None:
            decode_wait = (decoding + 1) * per_image / self.decode_workers
        self.batcher.admit(deadline - decode_wait, coming=decoding)

    async def classify(self, data: bytes, top_k: int, *, bulk: bool = False) -> list[ClassScore]:
        """Decodes ``data`` and classifies it within TIMEOUT seconds.

        ``bulk`` items (job work) have no deadline and only fill the capacity that
        interactive requests leave.
        """
        self.require_warm()
        assert self.batcher is not None
        deadline = None if bulk else asyncio.get_running_loop().time() + self.settings.timeout
        self._admit(deadline)  # before decoding an image the model could not serve in time
        pixels = await self._decode(data, deadline, bulk)
        try:
            return await self.batcher.submit(
                ClassifyInput(pixels, top_k),
                deadline=deadline,
                priority=1 if bulk else 0,
                admitted=True,
            )
        except BatcherError:
            raise
        except Exception as exc:
            raise InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}") from exc

    async def _classify_job_item(self, data: bytes) -> dict[str, Any]:
        try:
            scores = await self.classify(data, self.settings.top_k, bulk=True)
        except BatcherClosed as exc:
            raise HandBack(str(exc)) from exc
        return Classification.from_scores(scores).model_dump()

    async def _decode(self, data: bytes, deadline: float | None, bulk: bool) -> np.ndarray:
        assert self.classifier is not None
        if self._decoding >= self.settings.max_queue_size:
            self.decode_rejected_full += 1
            raise QueueFull("too many uploads are waiting to be decoded")
        interactive = 0 if bulk else 1
        self._decoding += 1
        self._decoding_interactive += interactive
        try:
            prepare = partial(self._timed_prepare, data)
            pool = self._bulk_decode_pool if bulk else self._decode_pool
            pending = asyncio.get_running_loop().run_in_executor(pool, prepare)
            async with asyncio.timeout_at(deadline):
                pixels, seconds = await pending
        except TimeoutError:
            raise DeadlineExceeded("timed out while decoding the image") from None
        finally:
            self._decoding -= 1
            self._decoding_interactive -= interactive
        self._decode_seconds.add(seconds)
        return pixels

    def _timed_prepare(self, data: bytes) -> tuple[np.ndarray, float]:
        assert self.classifier is not None
        started = time.perf_counter()
        pixels = self.classifier.prepare(data, max_pixels=self.settings.max_image_pixels)
        return pixels, time.perf_counter() - started

    def metadata(self) -> dict[str, Any]:
        settings = self.settings
        batcher = self.batcher
        return {
            "model": self.classifier.describe() if self.classifier else None,
            "ready": self.readiness() is None,
            "batching": {
                "max_batch_size": batcher.max_batch_size if batcher else None,
                "max_batch_size_setting": settings.max_batch_size,
                "max_batch_delay_ms": settings.max_batch_delay_ms,
                "max_queue_size": settings.max_queue_size,
                "timeout": settings.timeout,
            },
            "stats": batcher.stats.as_dict(batcher.queue_depth) if batcher else None,
            "decode": {
                "workers": self.decode_workers,
                "in_flight": self._decoding,
                "rejected_full": self.decode_rejected_full,
            },
            "jobs": {
                "store": settings.job_store,
                "disabled": self.jobs_disabled,
                "concurrency": self.jobs.concurrency,
                "in_flight": self.jobs.in_flight,
                "event_stream_watchers": len(self.job_store.feed),
            },
        }
