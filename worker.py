"""The gunicorn worker class: uvicorn-worker's, with the shutdown timing our settings set."""

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

from settings import get_settings


class DrainingUvicornWorker(UvicornWorker):  # type: ignore[misc]
    """Waits up to TIMEOUT + 1 s for in-flight requests when stopping (uvicorn-worker
    would wait forever, until gunicorn's SIGKILL), and leaves access logging to the app."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "timeout_graceful_shutdown": get_settings().connection_grace_s,
        "access_log": False,
    }
