"""Reads the one image a request carries, as multipart or as base64 JSON."""

import base64
import binascii
import json

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from classification import BadImage

# One image, and a few small text fields at most.
MAX_FILES = 1
MAX_FIELDS = 4
MAX_FIELD_BYTES = 16 * 1024

HOW_TO_SEND = (
    "send multipart/form-data with a 'file' field (curl -F file=@cat.jpg) "
    'or application/json {"image": "<base64>"}'
)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_body(request: Request, how_to_send: str) -> object:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, f"the body is not valid JSON: {how_to_send}") from None


async def read_image(request: Request) -> bytes:
    """The raw image bytes of a /cls request. Raises HTTPException for a malformed request."""
    media_type = _media_type(request)
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
    payload = await _json_body(request, HOW_TO_SEND)
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


async def read_job_images(request: Request, max_files: int) -> list[bytes | BaseException]:
    """The images of a POST /jobs, in order. An unreadable one becomes that item's error
    rather than failing the request; too many are refused with 413."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        items = await _read_job_multipart(request, max_files)
    elif media_type == "application/json":
        items = await _read_job_json(request)
    else:
        raise HTTPException(
            415,
            f"unsupported content type {media_type or 'none'!r}: send multipart/form-data "
            'with "files" parts, or application/json {"images": ["<base64>", ...]}',
        )
    if not items:
        raise HTTPException(422, "a job needs at least one image")
    if len(items) > max_files:
        raise HTTPException(
            413, f"{len(items)} images; a job takes at most {max_files} (MAX_JOB_FILES)"
        )
    return items


async def _read_job_multipart(request: Request, max_files: int) -> list[bytes | BaseException]:
    try:
        form = await request.form(
            max_files=max_files + 1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise HTTPException(
                413, f"a job takes at most {max_files} images (MAX_JOB_FILES)"
            ) from None
        raise
    try:
        items: list[bytes | BaseException] = []
        for part in form.getlist("files"):
            if isinstance(part, UploadFile):
                items.append(await part.read())
            else:
                items.append(BadImage("this 'files' part is text, not a file"))
        return items
    finally:
        await form.close()


async def _read_job_json(request: Request) -> list[bytes | BaseException]:
    payload = await _json_body(request, 'send {"images": ["<base64>", ...]}')
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list):
        raise HTTPException(422, 'JSON field "images" (a list of base64 strings) is missing')
    items: list[bytes | BaseException] = []
    for image in images:
        try:
            if not isinstance(image, str):
                raise BadImage("this item is not a base64 string")
            items.append(decode_base64(image))
        except HTTPException as exc:
            items.append(BadImage(str(exc.detail)))
        except BadImage as exc:
            items.append(exc)
    return items
