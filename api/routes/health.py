"""Liveness and readiness probes."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import EngineDep
from api.errors import RETRY_AFTER_S

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> dict[str, str]:
    """200 while the process is up."""
    return {"status": "alive"}


@router.get("/health/ready")
@router.get("/health", include_in_schema=False)
async def ready(engine: EngineDep) -> JSONResponse:
    """200 once the model is loaded and warm; 503 before that and while draining."""
    reason = engine.readiness()
    if reason is None:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"detail": reason}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
