"""Turns uploaded bytes into an RGB image, refusing anything that is not a safe image."""

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from classification.errors import BadImage, ImageTooLarge, UnsupportedImage

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""Pillow format names. The JPEG reader also opens MPO, the multi-picture JPEG that
many cameras write."""

# The pixel limit is checked from the header by decode_image, before any pixel is
# decoded, so Pillow's own, lower decompression-bomb limit is redundant.
Image.MAX_IMAGE_PIXELS = None

# Magic numbers of the accepted formats: such a file that Pillow cannot open is corrupt,
# not of the wrong type.
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_CORRUPT_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE_MODES = {"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"}


def decode_image(data: bytes, *, max_pixels: int, min_side: int) -> Image.Image:
    """Decodes an upload into an RGB image whose shorter side is at least ``min_side``
    (or the original size, if smaller), with EXIF orientation applied.

    Large JPEGs are decoded at a reduced DCT scale that still covers ``min_side``.
    Raises BadImage, UnsupportedImage or ImageTooLarge with a message for the caller.
    """
    if not data:
        raise BadImage("the upload is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        if claimed := _claimed_format(data):
            raise BadImage(f"corrupt {claimed} image: its header cannot be read") from None
        raise UnsupportedImage(
            "not an image in an accepted format: send JPEG, PNG, WebP, BMP, GIF or TIFF"
        ) from None
    except _CORRUPT_IMAGE_ERRORS as exc:
        raise BadImage(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    try:
        if image.format in ("JPEG", "MPO"):
            image.draft(None, (min_side, min_side))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upright image
        return _to_rgb(image)
    except _CORRUPT_IMAGE_ERRORS as exc:
        raise BadImage(f"corrupt or truncated {image.format} image: {exc}") from None


def _claimed_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # Signed: mode I holds 32-bit signed values, and a negative one cast to unsigned
        # first would wrap around to white instead of clipping to black.
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        narrow = (wide * 255 + 32767) // 65535
        return Image.fromarray(narrow.astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    if mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    raise UnsupportedImage(f"unsupported pixel mode {mode!r}: send 8- or 16-bit RGB or grayscale")
