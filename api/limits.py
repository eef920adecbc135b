"""A request-body size limit, counted while the body streams in, and refusals that
reach every client."""

import asyncio

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BodyTooLarge, error_response

# A refused request's body is read and dropped before the answer, as nginx lingers: a
# client that writes its whole body before reading (Python's urllib, many scripts) would
# otherwise see the connection reset instead of the answer. The reading is bounded by
# time, not bytes: DISCARD_SECONDS in all, and DISCARD_IDLE_SECONDS without a byte, so a
# stalled sender is answered then; any size that arrives within them is read.
DISCARD_SECONDS = 30.0
DISCARD_IDLE_SECONDS = 5.0


async def refuse(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    """Answers ``response`` without serving the request, after draining its body."""
    if _body_coming(scope):
        await discard_body(receive)
    await response(scope, receive, send)


async def discard_body(receive: Receive) -> bool:
    """Reads and drops the rest of the request body, within DISCARD_SECONDS, and
    DISCARD_IDLE_SECONDS between pieces. True when all of it was read."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DISCARD_SECONDS
    while True:
        try:
            async with asyncio.timeout(min(DISCARD_IDLE_SECONDS, end - loop.time())):
                message = await receive()
        except TimeoutError:
            return False
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


def _body_coming(scope: Scope) -> bool:
    """Whether the client is sending a body that must be read for it to see an answer.
    Not when it waits for ``Expect: 100-continue``'s go-ahead, which a refusal never
    gives, nor on a connection that stays open: uvicorn reads and drops the rest of an
    answered request's body itself."""
    declared = None
    close = scope.get("http_version") == "1.0"
    for name, value in scope["headers"]:
        if name == b"expect" and value.lower() == b"100-continue":
            return False
        if name == b"connection":
            close = b"close" in value.lower()
        elif name == b"transfer-encoding":
            declared = b"chunked"
        elif name == b"content-length":
            declared = value
    if not close or declared is None:
        return False
    return declared == b"chunked" or (declared.isdigit() and int(declared) > 0)


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413; job submissions (``POST /jobs`` and
    ``POST /{task}/jobs``, whichever task, those of models loaded after startup too)
    over ``max_job_bytes``.

    A declared Content-Length over the limit is refused before any byte is read. A body
    without one (chunked) is counted as it arrives, and the read that crosses the limit
    raises BodyTooLarge inside the endpoint.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_job_bytes: int) -> None:
        self.app = app
        self.default = (max_bytes, "MAX_UPLOAD_BYTES")
        self.jobs = (max_job_bytes, "MAX_JOB_BYTES")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.jobs if _submits_a_job(scope["path"]) else self.default
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            await refuse(scope, receive, send, error_response(BodyTooLarge(max_bytes, setting)))
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    if message.get("more_body", False):
                        await discard_body(receive)
                    raise BodyTooLarge(max_bytes, setting)
            return message

        await self.app(scope, counting_receive, send)


def _submits_a_job(path: str) -> bool:
    """``/jobs`` or ``/{task}/jobs``: the only routes at such paths submit jobs."""
    head, _, tail = path.rpartition("/")
    return tail == "jobs" and head.count("/") <= 1


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
