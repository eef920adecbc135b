"""A request-body size limit, counted while the body streams in."""

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    """The request body is larger than the configured limit."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(f"request body exceeds the {limit}-byte limit ({setting}); send less")


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413.

    A declared Content-Length over the limit is refused before any byte is read. A body
    without one (chunked) is counted as it arrives, and the read that crosses the limit
    raises BodyTooLarge inside the endpoint.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, tuple[int, str]] | None = None
    ) -> None:
        """``per_path`` maps an exact path to its own (limit, setting name)."""
        self.app = app
        self.default = (max_bytes, "MAX_UPLOAD_BYTES")
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.per_path.get(scope["path"], self.default)
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            response = JSONResponse({"detail": str(BodyTooLarge(max_bytes, setting))}, 413)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge(max_bytes, setting)
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
