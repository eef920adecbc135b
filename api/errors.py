"""The one place where errors become HTTP status codes."""

import json
import re
from typing import NamedTuple

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from batching import BatcherClosed, DeadlineExceeded, QueueFull
from jobs import IdempotencyConflict, StoreFull, StoreUnavailable
from repository.layout import ModelLoadError
from serving import InferenceFailed, InputError, ModelNotFound, NotReady
from serving.admission import RETRY_AFTER_S
from v2.core import ControlRefused


class BodyTooLarge(Exception):
    """The request body is larger than the configured limit."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(f"request body exceeds the {limit}-byte limit ({setting}); send less")


class ClientDisconnected(Exception):
    """The caller went away before its answer was ready."""


# (exception, status, what the caller should do). Starlette picks the handler of the
# most specific class in the exception's MRO. An InputError carries its own status.
_MAPPING: list[tuple[type[Exception], int, str]] = [
    (BodyTooLarge, 413, ""),
    (ModelNotFound, 404, ""),
    (ControlRefused, 400, ""),
    (ModelLoadError, 400, "; fix it in MODEL_REPOSITORY, then load again"),
    (InputError, 400, ""),
    (IdempotencyConflict, 422, "; send a new Idempotency-Key for new items"),
    (QueueFull, 503, "; the server is at capacity, retry after the Retry-After seconds"),
    (StoreFull, 503, "; wait for running jobs to finish, retry after the Retry-After seconds"),
    (StoreUnavailable, 503, "; jobs are unavailable for now, /cls still works; retry later"),
    (BatcherClosed, 503, "; the server is shutting down, retry on another replica"),
    (NotReady, 503, f"; retry in {RETRY_AFTER_S} s"),
    (DeadlineExceeded, 504, "; the server is overloaded or TIMEOUT is too short, retry later"),
    (InferenceFailed, 500, "; this is a server bug, see the server log"),
]


def describe(exc: BaseException) -> dict[str, int | str]:
    """The ``{"status", "detail"}`` a caller would get for ``exc`` from a task route."""
    for exc_type, status, advice in _MAPPING:
        if isinstance(exc, exc_type):
            if isinstance(exc, InputError):
                return {"status": exc.status, "detail": f"{exc}{exc.advice}"}
            return {"status": status, "detail": f"{exc}{advice}"}
    return {"status": 500, "detail": f"internal error: {type(exc).__name__}; see the server log"}


class ErrorAnswer(NamedTuple):
    """The answer for an error, before it becomes any server's response object."""

    status: int
    headers: dict[str, str]  # besides Content-Type (JSON) and Content-Length
    body: bytes  # {"detail": ...}, or {"error": ...} as the Open Inference Protocol says


def error_answer(exc: BaseException, key: str = "detail") -> ErrorAnswer:
    """The JSON answer for ``exc``, with Retry-After on a 503; its message under ``key``."""
    described = describe(exc)
    status = int(described["status"])
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(getattr(exc, "retry_after", RETRY_AFTER_S))
    # As Starlette's JSONResponse renders it.
    body = json.dumps({key: described["detail"]}, ensure_ascii=False, separators=(",", ":"))
    return ErrorAnswer(status, headers, body.encode())


def as_response(answer: ErrorAnswer) -> Response:
    return Response(answer.body, answer.status, answer.headers, media_type="application/json")


def error_response(exc: BaseException, key: str = "detail") -> Response:
    return as_response(error_answer(exc, key))


async def _handle(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
    """A 405 whose Allow lists the methods of every route at this path: Starlette's names
    only those of the first route that matched it (GET /jobs/{id}, not its DELETE)."""
    allowed = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
    for template, operations in request.app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            allowed |= {method.upper() for method in operations}
    allow = ", ".join(sorted(allowed))
    detail = f"{request.method} is not allowed here; use {allow}"
    return JSONResponse({"detail": detail}, 405, headers={"Allow": allow})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        return await _method_not_allowed(request, exc)
    return await http_exception_handler(request, exc)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this; 499 (as nginx logs it) keeps the access log honest.
    return Response(status_code=499)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type, _, _ in _MAPPING:
        app.add_exception_handler(exc_type, _handle)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    # Starlette's: the client went away while its body was being read.
    app.add_exception_handler(ClientDisconnect, _client_gone)
