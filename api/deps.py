"""FastAPI dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Request

from serving import Engine


async def get_engine(request: Request) -> Engine:
    # async: FastAPI would run a plain def in a worker thread, a thread hop per request.
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
