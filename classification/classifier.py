"""The image classification task: bytes in, top-k classes out. Knows nothing of HTTP."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classification.backend import Backend, TorchBackend, resolve_device, seconds_per_batch
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


def choose_batch_size(images_per_second: dict[int, float], share: float = 0.95) -> int:
    """The smallest batch size reaching ``share`` of the best measured throughput."""
    best = max(images_per_second.values())
    return min(size for size, rate in images_per_second.items() if rate >= share * best)


class BackendMismatch(Exception):
    """The ONNX model's outputs differ from PyTorch's on the sample image."""


_SAMPLE_IMAGE = Path(__file__).parent / "data" / "sample.jpg"
_AGREEMENT_TOLERANCE = 1e-4


class Classifier:
    """Decodes images and classifies batches of them with one model."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        device: str = "auto",
        channels_last: str = "auto",
        backend: str = "torch",
        dtype: str = "float32",
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        """``backend`` is torch, onnxruntime, or auto (ONNX Runtime on the CPU, PyTorch on
        CUDA). ONNX Runtime falls back to PyTorch, with one warning, when the export fails
        or its outputs differ from PyTorch's on a real photo."""
        self.model = model
        self.labels = model.labels
        self.preprocess = model.preprocess
        torch_device = resolve_device(device)
        self._channels_last_setting = channels_last
        self.torch_backend = TorchBackend(
            model.module,
            model.preprocess,
            torch_device,
            channels_last=channels_last != "false",
            dtype=getattr(torch, dtype),
        )
        self.backend: Backend = self.torch_backend
        self.fallback_reason: str | None = None
        if backend == "auto":
            backend = "torch" if torch_device.type == "cuda" else "onnxruntime"
        if backend == "onnxruntime":
            if torch_device.type != "cpu":
                raise ValueError(
                    "BACKEND=onnxruntime runs on the CPU: use DEVICE=cpu or BACKEND=torch"
                )
            self._try_onnx(cache_dir or Path(".model-cache"), threads or torch.get_num_threads())
        self.warmup_report: dict[str, Any] = {}

    def _try_onnx(self, cache_dir: Path, threads: int) -> None:
        from classification.onnx_backend import OnnxBackend, OnnxUnavailable, exported_model

        try:
            path = exported_model(
                self.model.module, self.model.name, self.preprocess.crop_size, cache_dir
            )
            onnx = OnnxBackend(path, self.preprocess, threads)
            self._check_agreement(onnx)
        except (OnnxUnavailable, BackendMismatch, ImportError, OSError) as exc:
            self.fallback_reason = f"{type(exc).__name__}: {exc}"
            logger.warning("ONNX Runtime is not used, serving with PyTorch: %s", exc)
            return
        self.backend = onnx

    def _check_agreement(self, onnx: Backend) -> None:
        pixels = self.prepare(_SAMPLE_IMAGE.read_bytes(), max_pixels=10**8)
        batch = np.stack([pixels, pixels[:, ::-1]])
        expected = self.torch_backend.probabilities(batch)
        difference = float((onnx.probabilities(batch) - expected).abs().max())
        if difference > _AGREEMENT_TOLERANCE:
            raise BackendMismatch(
                f"ONNX and PyTorch probabilities differ by {difference:.2e} on {_SAMPLE_IMAGE.name}"
            )
        self.agreement = difference

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

    def warmup(self, max_batch_size: int, *, tune: bool = False) -> dict[str, Any]:
        """Runs the batch shapes the batcher forms (powers of two up to the maximum) and
        returns what it measured.

        With CHANNELS_LAST=auto, PyTorch keeps the faster memory layout. With ``tune``,
        each shape is timed and ``report["batch_size"]`` is the smallest one that reaches
        95% of the best throughput. ``report["seconds_per_item"]`` is the model's time per
        image at that batch size.
        """
        started = time.perf_counter()
        report: dict[str, Any] = {"backend": self.backend.name}
        if self.backend is self.torch_backend and self._channels_last_setting == "auto":
            report["memory_format_ms"] = self._choose_memory_format(min(max_batch_size, 4))
        shapes = sorted({*(2**i for i in range(max_batch_size.bit_length())), max_batch_size})
        if tune:
            seconds = seconds_per_batch(self.backend, shapes)
            # Decided on the rounded table, so the choice always follows from what is shown.
            rates = {size: round(size / seconds[size], 1) for size in shapes}
            report["images_per_second"] = rates
            report["batch_size"] = choose_batch_size(rates)
        else:
            size = self.preprocess.crop_size
            blank = np.zeros((size, size, 3), dtype=np.uint8)
            for batch_size in shapes[:-1]:
                self.predict([ClassifyInput(blank, 1)] * batch_size)
            report["batch_size"] = max_batch_size
            # Warms up the largest shape as well, before timing it.
            seconds = seconds_per_batch(self.backend, [max_batch_size], rounds=1)
        report["seconds_per_item"] = round(seconds[report["batch_size"]] / report["batch_size"], 6)
        report["seconds"] = round(time.perf_counter() - started, 3)
        self.warmup_report = report
        logger.info("warm-up done: %s", report)
        return report

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
            "backend_fallback_reason": self.fallback_reason,
            "channels_last": getattr(backend, "channels_last", None),
            "num_labels": len(self.labels),
            "input_size": self.preprocess.crop_size,
            "warmup": self.warmup_report,
        }
