"""One log line and one metrics sample per request, tagged with a request id.

Pure ASGI on purpose: Starlette's BaseHTTPMiddleware breaks the disconnect detection that
lets the batcher drop abandoned requests.
"""

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import REQUEST_SECONDS, REQUESTS

logger = logging.getLogger("access")

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            REQUESTS.labels(method, route, str(status)).inc()
            REQUEST_SECONDS.labels(method, route).observe(seconds)
            logger.info(
                "%s %s %d %.1fms request_id=%s",
                method,
                _loggable(scope["path"]),
                status,
                seconds * 1000,
                request_id,
            )


_UNPRINTABLE = re.compile(r"[\x00-\x20\x7f-\x9f\u2028\u2029]")


def _loggable(path: str) -> str:
    """The percent-decoded path with control characters, line breaks and spaces encoded
    again, so that a request for ``/%0Afake`` cannot forge a log line."""
    return _UNPRINTABLE.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), path)


def _incoming_request_id(scope: Scope) -> str | None:
    """A caller's X-Request-ID, if it is short and plain enough to log and echo."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and _SAFE_REQUEST_ID.match(value):
            return str(value.decode())
    return None
