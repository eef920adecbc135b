"""What one server process runs: its tasks, the decode threads they share, and the jobs."""

import asyncio
import gc
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from batching import BatcherClosed, QueueFull
from jobs import (
    HandBack,
    ItemResult,
    JobRunner,
    JobStore,
    MemoryJobStore,
    RedisJobStore,
    StoreLimits,
    WorkItem,
)
from jobs.runner import DescribeError
from serving.admission import Refusal
from serving.device import device_type, limit_threads, resolve_device
from serving.errors import ModelNotFound, NotReady
from serving.registry import load_tasks
from serving.service import DecodePools, TaskService
from serving.task import LoadContext, Task
from settings import Settings

if TYPE_CHECKING:
    from repository.control import RepositoryControl

logger = logging.getLogger(__name__)

# Net allocations of tracked objects between young collections, once warm (Python's
# default is 700). At 4x the peak in open loop the default ran 350 young and 30 middle
# collections in 11 s, 0.4 s of a core holding the GIL, and freed nothing: what a
# request allocates goes when it ends, by reference counting.
YOUNG_GC_THRESHOLD = 20_000
# A job item that finds the queues full tries again after this, doubling up to a second.
JOB_ROOM_WAIT_S = 0.05


def open_job_store(settings: Settings) -> JobStore:
    """The store JOB_STORE names, with the limits that hold across all replicas."""
    limits = StoreLimits(
        settings.max_jobs,
        settings.max_queued_job_items,
        settings.max_queued_job_bytes,
        settings.max_finished_job_bytes,
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


class Engine:
    """Loads the tasks TASKS names and serves them until ``stop``.

    Each task gets its own batcher and model thread. The cores a worker has are split
    between the tasks' models: each gets INTRA_OP threads / number of tasks (at least
    one), so that tasks busy at once do not oversubscribe the CPU. The decode threads
    are shared.
    """

    def __init__(
        self,
        settings: Settings,
        describe_error: DescribeError,
        on_failure: Callable[[str], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """``describe_error`` turns a failed job item's exception into its error result.
        ``on_failure`` is called once if the engine can no longer serve (a failed warm-up,
        a dead batcher): the process should then exit so that its supervisor restarts it.
        ``on_ready`` is called once every task is warm, just before the engine turns
        ready."""
        self.settings = settings
        self._on_ready = on_ready
        # Each task by name; a repository model by name at its newest version served.
        self.services: dict[str, TaskService] = {}
        self.versions: dict[str, dict[str, TaskService]] = {}  # every version, by name
        # The repository's models and versions that could not be loaded, with why.
        self.failed: dict[str, dict[str, str]] = {}
        self.stopping = asyncio.Event()
        self.warmed_up = asyncio.Event()  # every task
        self.failure: str | None = None
        self._on_failure = on_failure
        self._pools: DecodePools | None = None
        self._context: LoadContext | None = None
        # MODEL_REPOSITORY's control (repository.control.RepositoryControl), if set.
        self.repository: RepositoryControl | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self.job_store = open_job_store(settings)
        self.jobs_disabled = settings.jobs_disabled_reason
        self.jobs = JobRunner(
            self.job_store,
            self._run_job_item,
            describe_error,
            concurrency=settings.job_concurrency or 4,
            max_deliveries=settings.job_max_deliveries,
            keep_alive_s=settings.job_claim_idle_s / 3,
        )

    @property
    def primary(self) -> TaskService:
        """The first task in TASKS: /jobs without a task, and /metadata's top level."""
        if not self.services:
            raise NotReady("this server serves no model: set TASKS, or fix MODEL_REPOSITORY")
        return next(iter(self.services.values()))

    def all_services(self) -> list[TaskService]:
        """Every task and every version of every model."""
        return [service for versions in self.versions.values() for service in versions.values()]

    def service(self, name: str, version: str = "") -> TaskService:
        """The task or model ``name``, at ``version`` ("": its newest). Raises ModelNotFound
        naming what is served, or why that model did not load."""
        versions = self.versions.get(name)
        failed = self.failed.get(name, {})
        if versions is None or (version and version not in versions):
            if version in failed or (not version and failed):
                reason = failed.get(version) or next(iter(failed.values()))
                raise ModelNotFound(f"model {name!r} is not available: {reason}")
            if versions is None:
                names = ", ".join(map(repr, self.versions)) or "no model"
                raise ModelNotFound(f"unknown model {name!r}; this server serves {names}")
            served = sorted(versions, key=_version_order)
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; it serves"
                f" version{'s' if len(served) > 1 else ''} {', '.join(served)}"
            )
        return versions[version] if version else self.services[name]

    async def start(
        self, tasks: list[Task[Any, Any]] | None = None, models: Sequence[Task[Any, Any]] = ()
    ) -> None:
        """Loads every task, and every version of the repository's ``models``; starts their
        batchers, and warms up in the background.

        Raises ValueError naming the setting when a task cannot be loaded. A model that
        cannot be loaded is set aside in ``failed``, with the reason in the log.
        """
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        tasks = tasks if tasks is not None else load_tasks(settings.tasks)
        limit_threads(settings.intra_op_threads)
        device = resolve_device(settings.device)
        context = LoadContext(
            device=device,
            threads=max(1, settings.intra_op_threads // max(1, len(tasks) + len(models))),
            cache_dir=settings.model_cache_dir,
        )
        self._context = context
        for task in tasks:
            await asyncio.to_thread(task.load, context)
        loaded = list(tasks)
        for model in models:
            if await self._load(model):
                loaded.append(model)
        on = device_type(device)
        if not settings.job_concurrency and on == "cuda":
            # A GPU batch costs little more than one item: let job items fill big batches.
            self.jobs.concurrency = 2 * settings.batch_size_ceiling
        light = bool(loaded) and all(task.light_model() for task in loaded)
        self._pools = DecodePools(settings.decode_threads(on, light_model=light))
        for task in loaded:
            self._serve(self._service(task))
        if self.jobs_disabled:
            logger.warning("%s", self.jobs_disabled)
        else:
            await self.job_store.start()
        self._warmup_task = asyncio.create_task(self._warm_up(), name="warmup")
        self._warmup_task.add_done_callback(self._on_warmup_done)

    async def _load(self, model: Task[Any, Any]) -> bool:
        """Loads a repository model, in a thread; one that fails is set aside in
        ``failed`` with the reason (and logged), and False returned."""
        assert self._context is not None, "start() first"
        try:
            await asyncio.to_thread(model.load, self._context)
        except Exception as exc:  # any file may be broken: that model only is set aside
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            logger.error("model %s version %s is not served: %s", model.name, model.version, reason)
            self.failed.setdefault(model.name, {})[model.version] = reason
            return False
        return True

    def _service(self, task: Task[Any, Any]) -> TaskService:
        assert self._pools is not None
        service = TaskService(task, self.settings, self._pools, on_crash=self._batcher_crashed)
        service.batcher.start()
        return service

    def _serve(self, service: TaskService) -> TaskService | None:
        """Serves ``service`` in place of the same version, if any, which it returns. The
        newest version takes the requests that name none."""
        versions = self.versions.setdefault(service.name, {})
        replaced = versions.get(service.version)
        versions[service.version] = service
        self.services[service.name] = versions[max(versions, key=_version_order)]
        failed = self.failed.get(service.name, {})
        for key in (service.version, ""):
            failed.pop(key, None)
        if not failed:
            self.failed.pop(service.name, None)
        return replaced

    async def add_model(self, model: Task[Any, Any]) -> bool:
        """Loads and warms up a version of a repository model beside what is served, then
        serves it at once, in place of the same version if it was served (which drains
        and stops). False, with the reason in ``failed``, if it could not load or warm
        up: what was served goes on."""
        if not await self._load(model):
            return False
        service = self._service(model)
        try:
            await service.warm_up()
        except Exception as exc:
            logger.error(
                "model %s version %s failed its warm-up", model.name, model.version, exc_info=exc
            )
            self.failed.setdefault(model.name, {})[model.version] = f"warm-up failed: {exc}"
            await service.batcher.stop(0)
            return False
        replaced = self._serve(service)
        logger.info("model %s version %s is served", model.name, model.version)
        if replaced is not None:
            await replaced.retire(self.settings.drain_timeout)
        return True

    async def remove_model(self, name: str, version: str) -> None:
        """Stops serving a version: new requests no longer find it, and those that did
        are answered before its batcher stops (within DRAIN_TIMEOUT)."""
        versions = self.versions.get(name, {})
        service = versions.pop(version, None)
        if service is None:
            return
        if versions:
            self.services[name] = versions[max(versions, key=_version_order)]
        else:
            del self.versions[name]
            del self.services[name]
        logger.info("model %s version %s is unloaded; draining it", name, version)
        await service.retire(self.settings.drain_timeout)

    def lease(self, name: str, version: str = "") -> AbstractContextManager[TaskService]:
        """The task or model ``name`` (at ``version``), held until the request ends: a
        version unloaded meanwhile answers it before it stops."""
        return self.service(name, version).lease()

    async def _warm_up(self) -> None:
        for service in self.all_services():
            await service.warm_up()
        # What is alive now (the libraries, the models) lives as long as the process.
        # Frozen, the garbage collector stops walking it: a full collection of a process
        # that imported torch took tens of milliseconds of the event loop, and requests
        # (refusals above all) allocate enough to set one off every few seconds.
        await asyncio.to_thread(gc.collect)
        gc.freeze()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        if self._on_ready is not None:
            self._on_ready()
        self.warmed_up.set()
        if not self.jobs_disabled and not self.stopping.is_set():
            self.jobs.start()

    def _on_warmup_done(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self.fail(f"warm-up failed ({type(error).__name__}: {error})", error)

    def _batcher_crashed(self, error: BaseException) -> None:
        self.fail(f"a batch loop crashed ({type(error).__name__}: {error})", error)

    def fail(self, reason: str, error: BaseException) -> None:
        """Marks the engine as unable to serve: liveness and readiness fail from now on,
        and ``on_failure`` is told, once."""
        if self.failure is not None:
            return
        self.failure = reason
        logger.critical("%s; this process cannot serve and stops", reason, exc_info=error)
        if self._on_failure is not None:
            self._on_failure(reason)

    async def _run_job_item(self, item: WorkItem, data: bytes) -> ItemResult:
        if item.task not in self.services:
            raise NotReady(
                f"this replica does not serve task {item.task!r}: give every replica the same"
                " TASKS and MODEL_REPOSITORY"
            )
        wait = JOB_ROOM_WAIT_S
        while True:
            try:
                with self.lease(item.task) as service:
                    result: ItemResult = await service.run_job_item(data)
            except BatcherClosed as exc:
                raise HandBack(str(exc)) from exc
            except QueueFull:
                # No room now: interactive traffic is busy. The item waits, never fails.
                if self.stopping.is_set():
                    raise HandBack("stopping while the queue was full") from None
                await asyncio.sleep(wait)
                wait = min(2 * wait, 1.0)
                continue
            return result

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
        """Refuses new work; finishes or hands back job items and drains the batchers,
        together within DRAIN_TIMEOUT; frees threads. Jobs are never cancelled."""
        self._stop_taking_work()
        drain_until = self._loop.time() + self.settings.drain_timeout
        await self.jobs.stop(self.settings.drain_timeout / 2)
        await self.job_store.close()
        if self._warmup_task is not None and not self._warmup_task.done():
            self._warmup_task.cancel()
            await asyncio.wait([self._warmup_task])
        left = max(0.0, drain_until - self._loop.time())
        await asyncio.gather(*(s.batcher.stop(left) for s in self.all_services()))
        if self._pools is not None:
            self._pools.shutdown()
        gc.unfreeze()  # the models may go now (a process that starts another engine)

    def admit(self, task: str, arrived_at: float, version: str = "") -> Refusal | None:
        """Whether a request for ``task`` that reached the server at ``arrived_at`` (the
        loop's clock) may in: None, or why not. It may if the engine is alive and the
        task could serve it within TIMEOUT of its arrival."""
        try:
            if (reason := self.liveness()) is not None:
                raise NotReady(reason)
            self.service(task, version).admit(arrived_at)
        except (NotReady, QueueFull) as exc:
            return Refusal(exc)
        except ModelNotFound:
            return None  # not a matter of load: the route answers 404, naming why
        return None

    def liveness(self) -> str | None:
        """None while the engine can serve, or will once warm; otherwise why it cannot."""
        return None if self.failure is None else f"{self.failure}; see the server log"

    def readiness(self) -> str | None:
        """None when every task is warm, otherwise why not."""
        if (reason := self.liveness()) is not None:
            return reason
        if self.stopping.is_set():
            return "the server is shutting down"
        if not self.warmed_up.is_set():
            return "the models are loading and warming up"
        return None

    def require_ready(self) -> None:
        """Raises NotReady until every task is loaded and warm, or once stopping."""
        if (reason := self.readiness()) is not None:
            raise NotReady(reason)

    def metadata(self) -> dict[str, Any]:
        """The first task's entries at the top level, every task's under ``tasks``."""
        settings = self.settings
        tasks = {name: service.metadata() for name, service in self.services.items()}
        primary = next(iter(tasks.values()), {})
        return {
            **primary,
            "ready": self.readiness() is None,
            "tasks": tasks,
            # Repository models and versions not served, with why (by name, by version).
            "unavailable": self.failed,
            "jobs": {
                "store": settings.job_store,
                "disabled": self.jobs_disabled,
                "concurrency": self.jobs.concurrency,
                "in_flight": self.jobs.in_flight,
                "event_stream_watchers": len(self.job_store.feed),
                "max_job_files": settings.max_job_files,
                "max_job_bytes": settings.max_job_bytes,
            },
        }


def _version_order(version: str) -> int:
    return int(version) if version.isdigit() else 0
