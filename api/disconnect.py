"""Abandons a request's work as soon as its client disconnects."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request

from api.errors import ClientDisconnected

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Runs ``work``; cancels it and raises ClientDisconnected if the client leaves first.

    Call only after the request body has been read, since this consumes ``receive``.
    """
    task = asyncio.create_task(work, name=f"request-work {request.url.path}")
    watcher = asyncio.create_task(_disconnected(request), name="request-disconnect-watch")
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()
        await asyncio.wait({task, watcher})
    if task.cancelled():
        raise ClientDisconnected("the client disconnected before its answer was ready")
    return task.result()
