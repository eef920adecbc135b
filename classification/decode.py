"""Turns uploaded bytes into an RGB image, refusing anything that is not a safe image."""

import io
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
# Rows converted at a time for 16-bit and transparent images, whose conversion would
# otherwise make several full-size copies (a 6300 x 6300 16-bit PNG took 0.8 GB).
_STRIP_ROWS = 256


class PixelBudget:
    """The pixels that the decodes of one process may hold at once. A decode takes its
    image's pixel count from the budget once the header is read (the whole budget at
    most, so that any image within MAX_IMAGE_PIXELS can be decoded alone) and gives it
    back when it ends; a decode that does not fit waits. With it, memory for decoding is
    bounded by the budget, whatever the number of decode threads."""

    def __init__(self, pixels: int) -> None:
        self.total = pixels
        self._free = pixels
        self._room = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.total)
        with self._room:
            self._room.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._room:
                self._free += pixels
                self._room.notify_all()

    @property
    def in_use(self) -> int:
        return self.total - self._free


# The process's decode budget, sized from MAX_DECODE_PIXELS when an image task loads.
budget = PixelBudget(80_000_000)


_sizing = threading.Lock()


def size_budget(pixels: int) -> None:
    """Gives the process a decode budget of ``pixels``. Every image task of a process
    reads the same MAX_DECODE_PIXELS, so after the first call this changes nothing."""
    global budget
    if budget.total == pixels:  # every decode of a task using classification.images asks
        return
    with _sizing:
        if budget.total != pixels:
            budget = PixelBudget(pixels)


def decode_image(data: bytes, *, max_pixels: int, min_side: int | None) -> Image.Image:
    """Decodes an upload into an RGB image whose shorter side is at least ``min_side``
    (or the original size, if smaller; None: the original size), with EXIF orientation
    applied.

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
        if min_side and image.format in ("JPEG", "MPO"):
            image.draft(None, (min_side, min_side))  # sets the size it will decode at
        with budget.hold(image.width * image.height):
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upright image
            return _to_rgb(image, min_side)
    except _CORRUPT_IMAGE_ERRORS as exc:
        raise BadImage(f"corrupt or truncated {image.format} image: {exc}") from None


def _claimed_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def _to_rgb(image: Image.Image, min_side: int | None) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _by_strips(image, min_side, _eight_bit_grey, _grey_to_rgb)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _by_strips(image, min_side, _premultiplied, _over_white)
    if mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    raise UnsupportedImage(f"unsupported pixel mode {mode!r}: send 8- or 16-bit RGB or grayscale")


Convert = Callable[[Image.Image], Image.Image]


def _by_strips(
    image: Image.Image, min_side: int | None, prepare: Convert, finish: Convert
) -> Image.Image:
    """The image in RGB, converted a strip of rows at a time: ``prepare`` turns a strip
    into a mode that can be averaged, it is reduced by the largest whole factor that
    keeps the shorter side at least ``min_side``, and ``finish`` makes it RGB. Memory
    beyond the decoded image is a strip's worth, plus the (reduced) result."""
    width, height = image.size
    factor = max(1, min(width, height) // min_side) if min_side else 1
    rows = max(factor, _STRIP_ROWS // factor * factor)  # whole reduction boxes per strip
    result = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        strip = prepare(image.crop((0, top, width, min(top + rows, height))))
        if factor > 1:
            strip = strip.reduce(factor)
        result.paste(finish(strip), (0, top // factor))
    return result


def _eight_bit_grey(strip: Image.Image) -> Image.Image:
    # Signed: mode I holds 32-bit signed values, and a negative one cast to unsigned
    # first would wrap around to white instead of clipping to black.
    wide = np.clip(np.asarray(strip, dtype=np.int64), 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _grey_to_rgb(strip: Image.Image) -> Image.Image:
    return strip.convert("RGB")


def _premultiplied(strip: Image.Image) -> Image.Image:
    # Averaged premultiplied, a reduced pixel's colour is that of what shows through.
    return strip.convert("RGBA").convert("RGBa")


def _over_white(strip: Image.Image) -> Image.Image:
    """A premultiplied RGBa strip composited over white."""
    pixels = np.asarray(strip, dtype=np.uint16)
    rgb = pixels[..., :3] + (255 - pixels[..., 3:])
    return Image.fromarray(np.minimum(rgb, 255).astype(np.uint8), mode="RGB")
