"""FastAPI dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Request

from api.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI would run a plain def in a worker thread, a thread hop per request.
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
