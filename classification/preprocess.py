"""Resize-and-crop on the CPU, normalisation on the model's device."""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Preprocess:
    """What a model expects: shorter side resized to ``resize_size``, a centred
    ``crop_size`` square, then ``(pixel - mean) / std`` per channel with pixels 0-255."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def crop(self, image: Image.Image) -> np.ndarray:
        """Returns the model's input window of an RGB image as a uint8 HxWx3 array.

        Equivalent to resize-then-center-crop, done as one antialiased bilinear resample
        of the source region that the crop keeps.
        """
        width, height = image.size
        # Sizes and offsets round as torchvision's Resize and CenterCrop do.
        short, long = sorted((width, height))
        resized_short = self.resize_size
        resized_long = int(self.resize_size * long / short)
        if width <= height:
            resized_w, resized_h = resized_short, resized_long
        else:
            resized_w, resized_h = resized_long, resized_short
        left = round((resized_w - self.crop_size) / 2)
        top = round((resized_h - self.crop_size) / 2)
        sx, sy = width / resized_w, height / resized_h
        box = (
            left * sx,
            top * sy,
            (left + self.crop_size) * sx,
            (top + self.crop_size) * sy,
        )
        size = (self.crop_size, self.crop_size)
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=box))

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Turns a uint8 NHWC batch into a normalised NCHW batch on the same device.

        The result is a channels_last view of the input's memory; call ``.contiguous()``
        for the default layout.
        """
        mean = torch.tensor(self.mean, device=pixels.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=dtype).view(1, 3, 1, 1)
        return (pixels.permute(0, 3, 1, 2).to(dtype) - mean) / std
