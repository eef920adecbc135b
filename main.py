"""Assembles the app. ``main:app`` serves under uvicorn or gunicorn; ``python main.py``
starts uvicorn on HOST:PORT."""

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from api.access_log import AccessLogMiddleware
from api.door import Door, EarlyAdmission
from api.errors import describe, install_error_handlers
from api.limits import BodySizeLimitMiddleware
from api.protocol import server_options
from api.routes import health, jobs, metadata, metrics
from api.routes.docs import docs_router
from api.routes.page import page_router, read_page
from api.routes.tasks import late_models_router, task_router
from serving import Engine, Task
from serving.registry import RESERVED, load_tasks
from settings import ConfigError, Settings, get_settings
from v2 import http as v2_http

if TYPE_CHECKING:
    from repository import RepositoryModel

logger = logging.getLogger("server")

TITLE = "Micro-batching inference server"


def configure_logging(settings: Settings) -> None:
    """Log lines to stdout, and to LOG_FILE if set, unless the host process configured
    logging already."""
    root = logging.getLogger()
    if root.handlers:
        return
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.log_file is not None:
        handlers.append(logging.FileHandler(settings.log_file))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
        handlers=handlers,
    )


@contextmanager
def unready_on_termination(engine: Engine) -> Iterator[None]:
    """Turns readiness off the moment SIGTERM or SIGINT arrives, then lets the server's
    own handler begin its graceful shutdown."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(sig: int, frame: FrameType | None) -> None:
        engine.begin_shutdown()
        handler = previous[signal.Signals(sig)]
        if callable(handler):
            handler(sig, frame)

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is handle:
                signal.signal(sig, handler)


def stop_this_process(reason: str) -> None:
    """Asks the server to shut down as on SIGTERM: requests in flight are answered, then
    the process exits, and its supervisor (gunicorn, Kubernetes, Docker) starts another."""
    os.kill(os.getpid(), signal.SIGTERM)


def announce_ready(settings: Settings, routes: list[str], started: float) -> None:
    """Logs the one line that says the server serves, as every task turns warm."""
    host, _, port = settings.gunicorn_bind.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host
    url = f"http://{host}:{port}" if port.isdigit() else settings.gunicorn_bind
    grpc = f", gRPC on port {settings.grpc_port}" if settings.grpc_port else ""
    logger.info(
        "Ready: %s/ serves %s (the page at /, the API at /docs; the Open Inference Protocol"
        " at /v2%s), warmed up in %.1f s",
        url,
        ", ".join(f"POST {route}" for route in routes),
        grpc,
        time.monotonic() - started,
    )


class ServingApp(FastAPI):
    """FastAPI with an admission door in front of all of it. Under a retry storm most
    requests are refusals, and FastAPI's own layers (telemetry, body limit, exception
    handling) cost more per request than the refusal itself; the door answers before them.
    ``door`` is also what AdmissionProtocol (api/protocol.py) asks, earlier still, under
    ``run()`` and the gunicorn worker. ``task_routes`` maps each task's path to its name
    and version ("": the newest); with ``late_models``, the door also judges the routes
    of models loaded after startup.
    ``cannot_start`` holds why a task could not load, for the one line that says so.
    """

    def __init__(
        self,
        task_routes: dict[str, tuple[str, str]],
        *,
        late_models: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.door = Door(self.state, task_routes, late_models=late_models)
        self._early = EarlyAdmission(super().__call__, self.door)
        self.cannot_start: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, self._startup_failure_told(send))
            return
        await self._early(scope, receive, send)

    def _startup_failure_told(self, send: Send) -> Send:
        """The server's ``send``, with the traceback Starlette reports for a failed startup
        replaced by the message alone when a task could not load for a reason it named
        (a setting to fix), as the configuration errors are."""

        async def told(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "lifespan.startup.failed" and self.cannot_start is not None:
                message = {**message, "message": f"cannot start: {self.cannot_start}"}
            await send(message)

        return told


def create_app(settings: Settings | None = None, *, exit_on_failure: bool = True) -> ServingApp:
    """The app serving the tasks TASKS names. Raises ValueError naming TASKS when a task
    cannot be imported or does not implement the interface, and naming WEB_DIR when it
    holds no page.

    With ``exit_on_failure`` the process stops itself when it can no longer serve (a
    failed warm-up, a dead batcher) instead of living on unready; tests that run the app
    in-process turn it off."""
    settings = settings or get_settings()
    configure_logging(settings)
    tasks = load_tasks(settings.tasks, allow_empty=settings.model_repository is not None)
    reserved = RESERVED | {task.name for task in tasks}
    models, set_aside = read_repository(settings, reserved)
    page = read_page(settings.web_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.monotonic()
        engine = Engine(
            settings,
            describe,
            stop_this_process if exit_on_failure else None,
            on_ready=lambda: announce_ready(settings, list(routes), started),
        )
        app.state.engine = engine
        grpc: Any = None
        try:
            try:
                engine.failed.update({name: {"": reason} for name, reason in set_aside.items()})
                await engine.start(tasks, models)
                if settings.model_repository is not None:
                    from repository.control import RepositoryControl

                    control = RepositoryControl(engine, settings.model_repository, reserved, models)
                    engine.repository = control
                    if settings.model_control == "poll":
                        control.start_polling(settings.model_poll_s)
                if settings.grpc_port:
                    from v2 import grpc_server  # compiles its messages on first import

                    grpc = await grpc_server.start(engine, settings)
            except ValueError as exc:  # a task or the gRPC port named what to fix
                if isinstance(app, ServingApp):
                    app.cannot_start = str(exc)
                raise
            with unready_on_termination(engine):
                yield
        finally:
            if grpc is not None:
                await grpc.stop(settings.connection_grace_s)
            if engine.repository is not None:
                await engine.repository.stop()
            await engine.stop()

    served: list[Task[Any, Any]] = [*tasks, *models]
    # One route per name: a repository model's newest version stands for its versions.
    routes_by_name = {task.name: task for task in sorted(served, key=_version_order)}
    routes = {
        path: route
        for task in served
        for path, route in [
            (f"/{task.name}", (task.name, "")),
            *v2_http.infer_paths(task.name, task.version),
        ]
    }
    app = ServingApp(
        routes,
        late_models=settings.model_control != "none",
        title=TITLE,
        summary="Concurrent callers share each model through an asyncio micro-batcher.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by api/routes/docs.py, offline
        redoc_url=None,
    )
    app.state.settings = settings
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        max_job_bytes=settings.max_job_bytes,
    )
    app.add_middleware(AccessLogMiddleware)
    install_error_handlers(app)
    for task in routes_by_name.values():
        app.include_router(task_router(task))
    for router in (jobs.router, health.router, metadata.router, metrics.router, v2_http.router):
        app.include_router(router)
    if settings.model_control != "none":  # models may appear after startup
        app.include_router(late_models_router())
    app.include_router(page_router(page))
    app.include_router(docs_router(TITLE))
    return app


def read_repository(
    settings: Settings, reserved: frozenset[str]
) -> tuple[list["RepositoryModel"], dict[str, str]]:
    """The tasks of MODEL_REPOSITORY's models, one per version served, and the models set
    aside with why; none without it. Raises ValueError when it is not a folder."""
    if settings.model_repository is None:
        return [], {}
    from repository import repository_models

    models, set_aside = repository_models(settings.model_repository, reserved)
    for name, reason in set_aside.items():
        logger.error("model %s of MODEL_REPOSITORY is not served: %s", name, reason)
    return models, set_aside


def _version_order(task: Task[Any, Any]) -> int:
    return int(task.version) if task.version.isdigit() else 0


def run() -> None:
    """Serves with uvicorn on HOST:PORT, or exits with the configuration error."""
    import uvicorn

    try:
        settings = get_settings()
        app = create_app(settings)
    except (ConfigError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        **server_options(settings),
        timeout_graceful_shutdown=settings.connection_grace_s,
        timeout_keep_alive=settings.keepalive,
    )
    engine: Engine | None = getattr(app.state, "engine", None)
    if engine is not None and engine.failure is not None:
        sys.exit(f"error: {engine.failure}")


if __name__ == "__main__":
    run()
else:
    app = create_app()
