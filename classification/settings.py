"""The image tasks' own settings: which model, how it computes, what it accepts."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from serving.task import TaskSettings


class ImageInputSettings(TaskSettings):
    """What any image task reads to decode its inputs (``classification.images``)."""

    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest image, width x height.")
    max_decode_pixels: int = Field(
        80_000_000,
        ge=1,
        description="Pixels that a worker's decodes may hold at once; the rest wait.",
    )


class ImageSettings(ImageInputSettings):
    """What ``/cls`` and ``/embed`` read. Each field is the environment variable of the
    same name."""

    model: str = Field(
        "efficientnet_lite0",
        min_length=1,
        description="efficientnet_lite0 (bundled weights) or a torchvision classification model.",
    )
    weights: Path | None = Field(None, description="State-dict file to load instead of defaults.")
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="auto: ONNX Runtime on the CPU, PyTorch on CUDA."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="PyTorch compute type; half types need CUDA."
    )
    channels_last: Literal["auto", "true", "false"] = Field(
        "auto", description="auto times both memory formats at warm-up and keeps the faster."
    )
    precision: Literal["auto", "float32", "int8"] = Field(
        "auto",
        description="ONNX Runtime's precision. auto: int8 when, at startup, it agrees with "
        "float32 and runs at least 1.3x as fast; else float32.",
    )
    calibration_dir: Path | None = Field(
        None, description="Images to calibrate int8 on, for a model other than the default."
    )


class ClassificationSettings(ImageSettings):
    """``/cls`` also reads TOP_K."""

    top_k: int = Field(5, ge=1, le=20, description="Classes returned when ?top_k= is not given.")
