"""An image task in one module: how bright an image is, overall and cell by cell.

What it shows, beside the text task in ``sentiment.py``:

- reading an image with the server's own decoding (``classification.images.read_image``:
  the pixel limit, EXIF orientation, every accepted format, reduced-scale JPEG decoding);
- a setting of its own (``DARK_BELOW``), read and checked at startup;
- an option (``?grid=``) that ``predict_batch`` needs: ``decode`` puts it in the item,
  since requests with different options share a batch;
- one batched torch call per batch.

    TASKS=examples.brightness:Brightness DARK_BELOW=0.3 make run
    curl -s "localhost:5001/brightness?grid=2" -F file=@tests/data/chelsea.jpg
"""

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch.nn import functional

from classification.images import IMAGE_JSON_SCHEMA, read_image
from classification.settings import ImageInputSettings
from serving import LoadContext, Payload, Task

SIDE = 64  # the thumbnail the model reads


class BrightnessSettings(ImageInputSettings):
    """MAX_IMAGE_PIXELS and MAX_DECODE_PIXELS, as for /cls, and one of its own."""

    dark_below: float = Field(
        0.25, gt=0, lt=1, description="DARK_BELOW: mean brightness under which an image is dark"
    )


class BrightnessOptions(BaseModel):
    grid: int = Field(1, ge=1, le=8, description="Also the brightness of a grid x grid split")


@dataclass(frozen=True)
class Thumbnail:
    """An image as the model reads it, with the grid its request asked for."""

    pixels: np.ndarray  # SIDE x SIDE luminance, 0..1
    grid: int


class BrightnessResult(BaseModel):
    brightness: float = Field(description="Mean luminance, 0 (black) to 1 (white)")
    dark: bool = Field(description="Whether brightness is under DARK_BELOW")
    grid: list[list[float]] = Field(description="Mean luminance of each cell, row by row")


class Brightness(Task[Thumbnail, BrightnessResult]):
    """How bright an image is: send it as `file`, or as `{"image": "<base64>"}`."""

    name = "brightness"
    Settings = BrightnessSettings
    Options = BrightnessOptions
    Response = BrightnessResult
    json_schema = IMAGE_JSON_SCHEMA
    jobs_field = "images"

    def load(self, context: LoadContext) -> None:
        settings: BrightnessSettings = self.settings
        self.dark_below = settings.dark_below
        self.device = context.device

    def decode(self, payload: Payload, options: BrightnessOptions) -> Thumbnail:
        # Raises the 400/413/415 errors of a bad image, which fail this request only.
        image = read_image(payload, self.settings, min_side=2 * SIDE)
        grey = image.convert("L").resize((SIDE, SIDE))
        return Thumbnail(np.asarray(grey, dtype=np.float32) / 255, options.grid)

    def predict_batch(self, items: list[Thumbnail]) -> list[BrightnessResult | Exception]:
        pixels = torch.from_numpy(np.stack([item.pixels for item in items])).to(self.device)
        means = pixels.mean(dim=(1, 2)).tolist()
        grids: list[list[list[float]]] = [[] for _ in items]
        # Requests with different options share a batch: one call per grid size in it.
        for size in {item.grid for item in items}:
            chosen = [index for index, item in enumerate(items) if item.grid == size]
            pooled = functional.adaptive_avg_pool2d(pixels[chosen], size).tolist()
            for index, cells in zip(chosen, pooled, strict=True):
                grids[index] = [[round(value, 4) for value in row] for row in cells]
        return [
            BrightnessResult(brightness=round(mean, 4), dark=mean < self.dark_below, grid=grid)
            for mean, grid in zip(means, grids, strict=True)
        ]

    def encode(self, result: BrightnessResult, options: BrightnessOptions) -> BrightnessResult:
        return result

    def example(self) -> Thumbnail:
        return Thumbnail(np.zeros((SIDE, SIDE), dtype=np.float32), 1)
