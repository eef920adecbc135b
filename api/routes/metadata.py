"""GET /metadata: what is being served, how, and the batcher's counters."""

from typing import Any

from fastapi import APIRouter

from api.deps import RuntimeDep

router = APIRouter(tags=["metadata"])


@router.get("/metadata")
async def metadata(runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.metadata()
