"""The gunicorn worker class: uvicorn-worker's, with the shutdown timing our settings set
and a heartbeat that also beats while the app starts."""

import asyncio
from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

from api.protocol import server_options
from settings import get_settings


class DrainingUvicornWorker(UvicornWorker):  # type: ignore[misc]
    """Waits up to TIMEOUT + 1 s for in-flight requests when stopping (uvicorn-worker
    would wait forever, until gunicorn's SIGKILL), and leaves access logging to the app.

    uvicorn first tells gunicorn it is alive once the app has started, so a model that
    loads (or exports to ONNX) for longer than WORKER_TIMEOUT would get the worker killed
    and restarted over and over. The loading runs in threads, so the event loop is free:
    a task on it beats from the start, and stops beating, as uvicorn's own heartbeat
    does, if the loop ever hangs.
    """

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "timeout_graceful_shutdown": get_settings().connection_grace_s,
        "access_log": False,
        **server_options(get_settings()),
    }

    async def _serve(self) -> None:
        beating = asyncio.create_task(self._beat())
        try:
            await super()._serve()
        finally:
            beating.cancel()

    async def _beat(self) -> None:
        interval = max(0.5, self.timeout / 4)
        while True:
            self.notify()
            await asyncio.sleep(interval)
