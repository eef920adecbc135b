"""One image model on one backend: decoding and warm-up; the choice of backend and
precision is classification/building.py's. Knows nothing of HTTP; the classifier and
the embedder build on it."""

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classification.backend import Backend, TorchBackend, forward_random, seconds_per_batch
from classification.building import SAMPLE_IMAGE, Building
from classification.decode import decode_image
from classification.models import LoadedModel
from classification.onnx_backend import OnnxBackend
from serving.device import resolve_device
from serving.warmup import batch_shapes, fastest, tune_batch_size


class ImageModel(Building):
    """Decodes images and runs batches of them through one model."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        device: str = "auto",
        channels_last: str = "auto",
        backend: str = "torch",
        dtype: str = "float32",
        precision: str = "float32",
        calibration_dir: Path | None = None,
        cache_dir: Path | None = None,
        threads: int | None = None,
        compare: Callable[[torch.Tensor], torch.Tensor] = lambda outputs: outputs,
    ) -> None:
        """``backend`` is torch, onnxruntime, or auto (ONNX Runtime on the CPU, PyTorch on
        CUDA). ONNX Runtime falls back to PyTorch, with one warning, when the export fails
        or its outputs, passed through ``compare``, differ from PyTorch's on a photo.

        ``precision`` (float32, int8 or auto) applies to ONNX Runtime: int8 quantises the
        export with the committed ranges of the default model or with ranges measured on
        ``calibration_dir``, in the recipe this CPU computes exactly (``int8_recipe``).
        int8 falls back to float32, with one warning, when it disagrees with float32 on
        the check photos; auto also keeps float32 when int8 is not INT8_MIN_SPEEDUP
        times as fast.
        """
        self.model = model
        self.preprocess = model.preprocess
        self._compare = compare
        torch_device = torch.device(resolve_device(device))
        self._channels_last_setting = channels_last
        self.torch_backend = TorchBackend(
            model.module,
            model.preprocess,
            torch_device,
            channels_last=channels_last != "false",
            dtype=getattr(torch, dtype),
        )
        self.cache_dir = cache_dir = cache_dir or Path(".model-cache")
        # The float32 ONNX Runtime backend, once it works: int8 is made from it.
        self._float32: OnnxBackend | None = None
        self.built = self._build(
            torch_device, backend, precision, calibration_dir, cache_dir, threads
        )

    @property
    def backend(self) -> Backend:
        return self.built.backend

    @property
    def precision(self) -> str:
        return self.built.precision

    @property
    def fallback_reason(self) -> str | None:
        return self.built.backend_fallback_reason

    @property
    def precision_reason(self) -> str:
        return self.built.precision_reason

    @property
    def int8_speedup(self) -> float | None:
        return self.built.int8_speedup

    @property
    def concurrency(self) -> int:
        """How many batches are worth computing at once (see ``Backend``)."""
        return self.backend.concurrency

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def prepare(self, data: bytes, *, max_pixels: int) -> np.ndarray:
        """Decodes and crops one upload to the model's uint8 input window.

        Raises the errors of ``decode_image``.
        """
        # JPEGs are decoded at a reduced scale that keeps twice the resolution the resize
        # needs: as fast as the tightest scale within 40%, and its crop differs from a
        # full decode by under one grey level on average.
        min_side = 2 * self.preprocess.resize_size
        image = decode_image(data, max_pixels=max_pixels, min_side=min_side)
        return self.preprocess.crop(image)

    def warmup(self, max_batch_size: int, *, tune: bool = False) -> dict[str, Any]:
        """Runs the batch shapes the batcher forms (powers of two up to the maximum) and
        returns what it measured.

        With CHANNELS_LAST=auto, PyTorch keeps the faster memory layout. With ``tune``,
        each shape is timed as the batcher runs it and ``report["batch_size"]`` is chosen
        by ``serving.warmup.tune_batch_size``, which keeps the choice for the next start
        in the model cache. ``report["seconds_per_item"]`` is the model's time per image
        at that batch size, in one of ``concurrency`` batches computing at once.
        """
        started = time.perf_counter()
        report: dict[str, Any] = {"backend": self.backend.name}
        if self.backend is self.torch_backend and self._channels_last_setting == "auto":
            report["memory_format_ms"] = self._choose_memory_format(min(max_batch_size, 4))
        report["decode_seconds_per_item"] = self._decode_seconds()
        run = forward_random(self.backend)
        side_by_side = getattr(self.backend, "side_by_side", None)
        if side_by_side is None:
            side_by_side = contextlib.nullcontext
        else:
            # Tuning runs on the single-threaded session; a call alone uses the other.
            for size in batch_shapes(max_batch_size):
                run(size)
        with side_by_side():
            report |= tune_batch_size(
                run,
                max_batch_size,
                tune=tune,
                unit="images",
                concurrency=self.concurrency,
                remember=self._batch_size_file(max_batch_size),
            )
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report

    def _batch_size_file(self, max_batch_size: int) -> Path:
        """Where the batch size chosen for this model, backend and machine is kept."""
        backend = self.backend
        key = json.dumps(
            [
                {
                    key: value
                    for key, value in self.describe().items()
                    if not key.endswith(("_reason", "_speedup", "channels_last"))
                },
                getattr(backend, "model_path", Path()).name,
                self.concurrency,
                max_batch_size,
                platform.processor() or platform.machine(),
                torch.cpu.get_capabilities().get("cpu_name"),
                os.cpu_count(),
            ],
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.model.name}-batch-size-{digest}.json"

    def _decode_seconds(self, rounds: int = 3) -> float:
        """The best time of decoding and cropping the sample photo: a floor for what an
        upload costs the decode threads."""
        data = SAMPLE_IMAGE.read_bytes()
        return fastest(lambda: self.prepare(data, max_pixels=10**8), rounds)

    def _choose_memory_format(self, batch_size: int) -> dict[str, Any]:
        backend = self.torch_backend
        timings = {}
        for enabled in (False, True):
            backend.set_channels_last(enabled)
            timings[enabled] = seconds_per_batch(backend, [batch_size])[batch_size]
        backend.set_channels_last(timings[True] <= timings[False])
        return {
            "batch_size": batch_size,
            "contiguous": round(timings[False] * 1000, 2),
            "channels_last": round(timings[True] * 1000, 2),
        }

    def describe(self) -> dict[str, Any]:
        backend = self.backend
        return {
            "name": self.model.name,
            "weights": self.model.weights,
            "device": str(backend.device),
            "backend": backend.name,
            "backend_fallback_reason": self.built.backend_fallback_reason,
            "precision": self.built.precision,
            "precision_reason": self.built.precision_reason,
            "int8_recipe": None if self.built.int8_recipe is None else self.built.int8_recipe.name,
            "int8_speedup": self.built.int8_speedup,
            "channels_last": getattr(backend, "channels_last", None),
            "input_size": self.preprocess.crop_size,
        }
