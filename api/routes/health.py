"""Liveness and readiness probes."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import EngineDep
from api.schemas import ErrorBody
from serving.admission import RETRY_AFTER_S

router = APIRouter(tags=["health"])


@router.get("/health/live", responses={503: {"model": ErrorBody}})
async def live(engine: EngineDep) -> JSONResponse:
    """200 while the process can serve, or will once warm; 503 once it cannot (a failed
    warm-up, a dead batcher), as it exits for its supervisor to start a fresh one."""
    if (reason := engine.liveness()) is not None:
        return JSONResponse({"detail": reason}, 503)
    return JSONResponse({"status": "alive"})


@router.get("/health/ready")
@router.get("/health", include_in_schema=False)
async def ready(engine: EngineDep) -> JSONResponse:
    """200 once the model is loaded and warm; 503 before that and while draining."""
    reason = engine.readiness()
    if reason is None:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"detail": reason}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
