"""GET /metadata: what is being served, how, and the batcher's counters."""

from typing import Any

from fastapi import APIRouter

from api.deps import EngineDep

router = APIRouter(tags=["metadata"])


@router.get("/metadata")
async def metadata(engine: EngineDep) -> dict[str, Any]:
    return engine.metadata()
