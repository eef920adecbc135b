"""Reads what a request carries for a task: one multipart file or a JSON body, or for a
job, many files or a JSON list. Only parsing: the task decodes, off the event loop."""

import asyncio
import json

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from api.json_pieces import TooManyItems, TooManyValues, loads_in_pieces
from serving import InputError, Payload

# One file, and a few small text fields at most.
MAX_FILES = 1
MAX_FIELDS = 4
MAX_FIELD_BYTES = 16 * 1024

HOW_TO_SEND = (
    "send multipart/form-data with a 'file' field (curl -F file=@input) or an"
    " application/json body (curl --json @body.json); /docs shows what each route takes"
)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# A body this small parses in well under a millisecond, into a few megabytes at most:
# not worth a thread.
PARSE_INLINE_BYTES = 256 * 1024
# A larger body may hold one JSON value per 4 bytes, and a million at most. A value can
# cost 70 bytes as a Python object (``{}`` is 64), so a body parses into its size again
# (its strings) plus 70 MB at most, however it is made.
JSON_BYTES_PER_VALUE = 4
MAX_JSON_VALUES = 1_000_000


def max_json_values(nbytes: int) -> int:
    return min(MAX_JSON_VALUES, 1024 + nbytes // JSON_BYTES_PER_VALUE)


async def gathered(request: Request) -> bytearray:
    """The body, gathered into one buffer as it arrives. Joining its pieces at the end, as
    ``request.body()`` does, would copy it all at once on the event loop: 40 ms per 65 MB."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


async def _json_body(request: Request, how_to_send: str, max_items: int | None = None) -> object:
    """The parsed body. Stops at an array of more than ``max_items`` (413, naming
    MAX_JOB_FILES) or too many values (413)."""
    body = await gathered(request)
    try:
        if len(body) <= PARSE_INLINE_BYTES:
            return json.loads(body)
        limits = {"max_items": max_items, "max_values": max_json_values(len(body))}
        return await asyncio.to_thread(loads_in_pieces, body, **limits)
    except TooManyItems as exc:
        raise HTTPException(
            413, f"more than {exc.limit} items; a job takes at most {exc.limit} (MAX_JOB_FILES)"
        ) from None
    except TooManyValues as exc:
        raise HTTPException(
            413,
            f"the JSON body holds more than {exc.limit} values (one per"
            f" {JSON_BYTES_PER_VALUE} bytes, {MAX_JSON_VALUES} at most): send fewer values",
        ) from None
    except RecursionError:
        raise HTTPException(400, f"the JSON body is nested too deeply: {how_to_send}") from None
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, f"the body is not valid JSON: {how_to_send}") from None


async def read_payload(request: Request) -> Payload:
    """The multipart ``file`` part's bytes, or the parsed JSON body. Raises
    HTTPException for a malformed request."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        return await _read_multipart(request)
    if media_type == "application/json":
        return await _json_body(request, HOW_TO_SEND)
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


async def read_job_payloads(
    request: Request, max_files: int, field: str
) -> list[Payload | InputError]:
    """The items of a job, in order: multipart ``files`` parts, or the list under
    ``field`` of a JSON body. A text part becomes that item's error rather than failing
    the request; too many items are refused with 413."""
    media_type = _media_type(request)
    how_to_send = (
        f'send multipart/form-data with "files" parts, or application/json {{"{field}": [...]}}'
    )
    items: list[Payload | InputError]
    if media_type == "multipart/form-data":
        items = await _read_job_multipart(request, max_files)
    elif media_type == "application/json":
        payload = await _json_body(request, how_to_send, max_files)
        values = payload.get(field) if isinstance(payload, dict) else None
        if not isinstance(values, list):
            raise HTTPException(422, f'JSON field "{field}" (a list) is missing: {how_to_send}')
        items = values
    else:
        raise HTTPException(
            415, f"unsupported content type {media_type or 'none'!r}: {how_to_send}"
        )
    if not items:
        raise HTTPException(422, "a job needs at least one item")
    if len(items) > max_files:
        raise HTTPException(
            413, f"{len(items)} items; a job takes at most {max_files} (MAX_JOB_FILES)"
        )
    return items


async def _read_job_multipart(request: Request, max_files: int) -> list[Payload | InputError]:
    try:
        form = await request.form(
            max_files=max_files + 1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise HTTPException(
                413, f"a job takes at most {max_files} items (MAX_JOB_FILES)"
            ) from None
        raise
    try:
        items: list[Payload | InputError] = []
        for part in form.getlist("files"):
            if isinstance(part, UploadFile):
                items.append(await part.read())
            else:
                items.append(InputError("this 'files' part is text, not a file"))
        return items
    finally:
        await form.close()
