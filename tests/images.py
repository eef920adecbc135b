"""Real photos and malformed or unusual variants of them, made at test time."""

import io
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data"
PHOTOS = {
    "chelsea": DATA / "chelsea.jpg",
    "coffee": DATA / "coffee.jpg",
    "rocket": DATA / "rocket.jpg",
}
CAT_IDS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# The top class each photo may get. chelsea is a near tie in float32 (Egyptian cat 0.39,
# tiger cat 0.35), which the int8 model (PRECISION=auto) may swap.
TOP1 = {"chelsea": {"Egyptian cat", "tiger cat"}, "coffee": {"espresso"}, "rocket": {"missile"}}


def photo_of(label: str) -> str:
    """The photo whose top class ``label`` is."""
    return next(name for name, labels in TOP1.items() if label in labels)


def photo_bytes(name: str) -> bytes:
    return PHOTOS[name].read_bytes()


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def chelsea() -> Image.Image:
    return Image.open(PHOTOS["chelsea"]).convert("RGB")


def truncated_jpeg() -> bytes:
    data = photo_bytes("chelsea")
    return data[: len(data) // 3]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds one row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x00" * 3 * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", row)
        + _png_chunk(b"IEND", b"")
    )


def png_rgb16(image: Image.Image) -> bytes:
    """A real 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    pixels = np.asarray(image.convert("RGB")).astype(">u2") * 257
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def gray16_png(image: Image.Image) -> bytes:
    pixels = np.asarray(image.convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(pixels), "PNG")


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    """Pixels stored turned 90 degrees counter-clockwise, with EXIF orientation 6
    telling viewers to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)


def rgba_png(image: Image.Image) -> bytes:
    rgba = image.convert("RGBA")
    rgba.putalpha(255)
    alpha = np.asarray(rgba).copy()
    alpha[:10, :, 3] = 0  # a transparent strip at the top
    return encode(Image.fromarray(alpha), "PNG")


@cache
def convertible_variants() -> dict[str, bytes]:
    """The same cat in every accepted format and pixel mode."""
    cat = chelsea()
    return {
        "jpeg-cmyk": encode(cat.convert("CMYK"), "JPEG", quality=92),
        "jpeg-gray": encode(cat.convert("L"), "JPEG", quality=92),
        "png-rgba": rgba_png(cat),
        "png-palette": encode(cat.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "png-gray16": gray16_png(cat),
        "png-rgb16": png_rgb16(cat),
        "jpeg-exif-rotated": exif_rotated_jpeg(cat),
        "webp": encode(cat, "WEBP", quality=90),
        "bmp": encode(cat, "BMP"),
        "gif": encode(cat, "GIF"),
        "tiff": encode(cat, "TIFF"),
    }
