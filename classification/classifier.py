"""The image classification task: bytes in, top-k classes out. Knows nothing of HTTP."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from classification.backend import Backend, TorchBackend, resolve_device
from classification.decode import decode_image
from classification.models import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClassifyInput:
    """One decoded, cropped image waiting for the model, and how many classes to return."""

    pixels: np.ndarray
    top_k: int


@dataclass(frozen=True, slots=True)
class ClassScore:
    class_id: int
    label: str
    score: float


class Classifier:
    """Decodes images and classifies batches of them with one model."""

    def __init__(self, model: LoadedModel, *, device: str = "auto", channels_last: str = "auto"):
        self.model = model
        self.labels = model.labels
        self.preprocess = model.preprocess
        torch_device = resolve_device(device)
        self._channels_last_setting = channels_last
        self.backend: Backend = TorchBackend(
            model.module, model.preprocess, torch_device, channels_last=channels_last != "false"
        )
        self.warmup_report: dict[str, Any] = {}

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

    def predict(self, batch: Sequence[ClassifyInput]) -> list[list[ClassScore]]:
        """Classifies a batch in one forward pass; one top-k list per input, in order."""
        pixels = np.stack([item.pixels for item in batch])
        probabilities = self.backend.probabilities(pixels)
        k = min(max(item.top_k for item in batch), probabilities.shape[1])
        scores, class_ids = probabilities.topk(k, dim=1)
        return [
            [
                ClassScore(class_id, self.labels[class_id], score)
                for class_id, score in list(zip(row_ids, row_scores, strict=True))[: item.top_k]
            ]
            for item, row_scores, row_ids in zip(
                batch, scores.tolist(), class_ids.tolist(), strict=True
            )
        ]

    def warmup(self, max_batch_size: int) -> dict[str, Any]:
        """Runs the batch shapes the batcher forms most (powers of two and the maximum)
        once each, and picks the memory format.

        With CHANNELS_LAST=auto, times both layouts on a small batch and keeps the faster
        one. Returns what it measured.
        """
        started = time.perf_counter()
        backend = self.backend
        report: dict[str, Any] = {}
        if isinstance(backend, TorchBackend) and self._channels_last_setting == "auto":
            probe_size = min(max_batch_size, 4)
            timings = {}
            for enabled in (False, True):
                backend.set_channels_last(enabled)
                timings[enabled] = backend.seconds_per_batch(probe_size)
            backend.set_channels_last(timings[True] <= timings[False])
            report["memory_format_ms"] = {
                "batch_size": probe_size,
                "contiguous": round(timings[False] * 1000, 2),
                "channels_last": round(timings[True] * 1000, 2),
            }
        size = self.preprocess.crop_size
        blank = np.zeros((size, size, 3), dtype=np.uint8)
        shapes = sorted({*(2**i for i in range(max_batch_size.bit_length())), max_batch_size})
        for batch_size in shapes:
            self.predict([ClassifyInput(blank, 1)] * batch_size)
        report["batch_sizes"] = shapes
        report["seconds"] = round(time.perf_counter() - started, 3)
        self.warmup_report = report
        logger.info("warm-up done: %s", report)
        return report

    def describe(self) -> dict[str, Any]:
        backend = self.backend
        return {
            "name": self.model.name,
            "weights": self.model.weights,
            "device": str(backend.device),
            "backend": backend.name,
            "channels_last": getattr(backend, "channels_last", None),
            "num_labels": len(self.labels),
            "input_size": self.preprocess.crop_size,
            "warmup": self.warmup_report,
        }
