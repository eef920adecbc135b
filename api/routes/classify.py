"""POST /cls: classify one image."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api.deps import RuntimeDep
from api.disconnect import cancel_on_disconnect
from api.schemas import Classification, ErrorBody
from api.upload import read_image

router = APIRouter(tags=["classification"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Corrupt or truncated image, invalid base64 or JSON",
        413: "Body over MAX_UPLOAD_BYTES, or image over MAX_IMAGE_PIXELS",
        415: "Not an image, or a format or content type that is not accepted",
        422: "The 'file' field or the JSON 'image' field is missing; top_k out of range",
        503: "Queue full, model not ready, or shutting down; see Retry-After",
        504: "No answer within TIMEOUT seconds",
    }.items()
}

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "description": "base64, or a data: URI"}
                    },
                }
            },
        },
    }
}


@router.post("/cls", response_model=Classification, responses=_ERRORS, openapi_extra=_BODY)
async def classify(
    request: Request,
    runtime: RuntimeDep,
    top_k: Annotated[int | None, Query(ge=1, le=20, description="Classes to return")] = None,
) -> Classification:
    """Classifies one image, sent as multipart `file` or as JSON `{"image": base64}`."""
    runtime.admit()  # refuse an overload before spending time on the upload
    data = await read_image(request)
    k = top_k or runtime.settings.top_k
    scores = await cancel_on_disconnect(request, runtime.classify(data, k))
    return Classification.from_scores(scores)
