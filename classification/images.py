"""Decoding for image tasks, the built-in ones and yours: an upload or a JSON image, read
as ``/cls`` and ``/embed`` read it.

    from classification.images import IMAGE_JSON_SCHEMA, read_image
    from classification.settings import ImageInputSettings

    class Thumbnails(Task[...]):
        Settings = ImageInputSettings        # MAX_IMAGE_PIXELS, MAX_DECODE_PIXELS
        json_schema = IMAGE_JSON_SCHEMA      # {"image": "<base64>"} in /docs
        jobs_field = "images"

        def decode(self, payload, options):
            image = read_image(payload, self.settings, min_side=224)  # a PIL RGB image
            ...

``examples/brightness.py`` is a complete task built on it.
"""

import base64
import binascii
from typing import Any

from PIL import Image

from classification import decode
from classification.errors import BadImage
from classification.settings import ImageInputSettings
from serving.task import InputError, Payload

HOW_TO_SEND = (
    "send multipart/form-data with a 'file' field (curl -F file=@cat.jpg) "
    'or application/json {"image": "<base64>"}'
)


def image_text(value: Any) -> str:
    """The base64 text of a JSON image: ``{"image": "<base64>"}`` or the string itself."""
    text = value.get("image") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise InputError(f"JSON field 'image' (a base64 string) is missing: {HOW_TO_SEND}", 422)
    return text


def image_bytes(payload: Payload) -> bytes:
    """The image of a request: an uploaded file, ``{"image": "<base64>"}``, or (as a job's
    JSON item) the base64 string itself, optionally as a ``data:`` URI."""
    if isinstance(payload, bytes):
        return payload
    text = image_text(payload)
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadImage("a data: URI must look like data:image/jpeg;base64,<data>")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("field 'image' is not valid base64") from None


IMAGE_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {
            "type": "string",
            "contentEncoding": "base64",
            "description": "The image file, base64-encoded (a data: URI works too)",
        }
    },
}
"""The JSON body of an image task, for a task's ``json_schema``."""


def read_image(
    payload: Payload, settings: ImageInputSettings, *, min_side: int | None = None
) -> Image.Image:
    """The 8-bit RGB image a request or job item carries: an uploaded file's bytes,
    ``{"image": "<base64>"}``, or a base64 string (a ``data:`` URI too).

    Checked against MAX_IMAGE_PIXELS from the header, before any pixel is decoded, and
    decoded within the process's MAX_DECODE_PIXELS budget. EXIF orientation is applied;
    grayscale, palette, CMYK, transparent (composited on white) and 16-bit images are
    converted. With ``min_side``, a large image is decoded smaller, down to the smallest
    size whose shorter side is still ``min_side`` (a JPEG at a reduced DCT scale, much
    faster): pass twice the size your model resizes to. Raises BadImage (400),
    UnsupportedImage (415) or ImageTooLarge (413), which fail only this request.
    """
    decode.size_budget(settings.max_decode_pixels)
    data = image_bytes(payload)
    return decode.decode_image(data, max_pixels=settings.max_image_pixels, min_side=min_side)
