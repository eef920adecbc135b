"""Reads the one image a request carries, as multipart or as base64 JSON."""

import base64
import binascii
import json

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

# One image, and a few small text fields at most.
MAX_FILES = 1
MAX_FIELDS = 4
MAX_FIELD_BYTES = 16 * 1024

HOW_TO_SEND = (
    "send multipart/form-data with a 'file' field (curl -F file=@cat.jpg) "
    'or application/json {"image": "<base64>"}'
)


async def read_image(request: Request) -> bytes:
    """The raw image bytes of a /cls request. Raises HTTPException for a malformed request."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request)
    if media_type == "application/json":
        return await _read_json(request)
    raise HTTPException(415, f"unsupported content type {media_type or 'none'!r}: {HOW_TO_SEND}")


async def _read_multipart(request: Request) -> bytes:
    async with request.form(
        max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES
    ) as form:
        upload = form.get("file")
        if upload is None:
            raise HTTPException(422, f"multipart field 'file' is missing: {HOW_TO_SEND}")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "multipart field 'file' must be a file, not a text value")
        return await upload.read()


async def _read_json(request: Request) -> bytes:
    try:
        payload = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, f"the body is not valid JSON: {HOW_TO_SEND}") from None
    image = payload.get("image") if isinstance(payload, dict) else None
    if not isinstance(image, str):
        raise HTTPException(422, f"JSON field 'image' (a base64 string) is missing: {HOW_TO_SEND}")
    return decode_base64(image)


def decode_base64(text: str) -> bytes:
    """Decodes standard base64, optionally behind a ``data:<type>;base64,`` prefix."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise HTTPException(400, "a data: URI must look like data:image/jpeg;base64,<data>")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "field 'image' is not valid base64") from None
