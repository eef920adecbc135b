"""GET /metrics: Prometheus text."""

from fastapi import APIRouter, Response

from api.metrics import render

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    body, content_type = render()
    return Response(body, media_type=content_type)
