"""Assembles the app. ``main:app`` serves under uvicorn or gunicorn; ``python main.py``
starts uvicorn on HOST:PORT."""

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.limits import BodySizeLimitMiddleware
from api.routes import classify, health, metadata
from api.runtime import Runtime
from settings import ConfigError, Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        try:
            await runtime.start()
            yield
        finally:
            await runtime.stop()

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    app = FastAPI(
        title="Micro-batching image classifier",
        summary="Concurrent callers share one model through an asyncio micro-batcher.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    install_error_handlers(app)
    for router in (classify.router, health.router, metadata.router):
        app.include_router(router)
    return app


def run() -> None:
    """Serves with uvicorn on HOST:PORT, or exits with the configuration error."""
    import uvicorn

    try:
        settings = get_settings()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level
    )


if __name__ == "__main__":
    run()
else:
    app = create_app()
