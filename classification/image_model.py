"""One image model on one backend: decoding, the backend choice, warm-up. Knows nothing
of HTTP; the classifier and the embedder build on it."""

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classification.backend import Backend, TorchBackend, forward_random, seconds_per_batch
from classification.decode import decode_image
from classification.models import LoadedModel
from serving.task import resolve_device
from serving.warmup import tune_batch_size

logger = logging.getLogger(__name__)


class BackendMismatch(Exception):
    """The ONNX model's outputs differ from PyTorch's on the sample image."""


_SAMPLE_IMAGE = Path(__file__).parent / "data" / "sample.jpg"
_AGREEMENT_TOLERANCE = 1e-4


class ImageModel:
    """Decodes images and runs batches of them through one model."""

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
        compare: Callable[[torch.Tensor], torch.Tensor] = lambda outputs: outputs,
    ) -> None:
        """``backend`` is torch, onnxruntime, or auto (ONNX Runtime on the CPU, PyTorch on
        CUDA). ONNX Runtime falls back to PyTorch, with one warning, when the export fails
        or its outputs, passed through ``compare``, differ from PyTorch's on a photo."""
        self.model = model
        self.preprocess = model.preprocess
        self._compare = compare
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

    def _try_onnx(self, cache_dir: Path, threads: int) -> None:
        from classification.onnx_backend import OnnxUnavailable, cached_backend

        try:
            onnx = cached_backend(
                self.model.module, self.model.name, self.preprocess, cache_dir, threads
            )
            self._check_agreement(onnx)
        except (OnnxUnavailable, BackendMismatch, ImportError, OSError) as exc:
            self.fallback_reason = f"{type(exc).__name__}: {exc}"
            logger.warning("ONNX Runtime is not used, serving with PyTorch: %s", exc)
            return
        self.backend = onnx

    def _check_agreement(self, onnx: Backend) -> None:
        pixels = self.prepare(_SAMPLE_IMAGE.read_bytes(), max_pixels=10**8)
        batch = np.stack([pixels, pixels[:, ::-1]])
        expected = self._compare(self.torch_backend.forward(batch))
        difference = float((self._compare(onnx.forward(batch)) - expected).abs().max())
        if difference > _AGREEMENT_TOLERANCE:
            raise BackendMismatch(
                f"ONNX and PyTorch outputs differ by {difference:.2e} on {_SAMPLE_IMAGE.name}"
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

    def warmup(self, max_batch_size: int, *, tune: bool = False) -> dict[str, Any]:
        """Runs the batch shapes the batcher forms (powers of two up to the maximum) and
        returns what it measured.

        With CHANNELS_LAST=auto, PyTorch keeps the faster memory layout. With ``tune``,
        each shape is timed and ``report["batch_size"]`` is the smallest one
        that reaches 95% of the best throughput. ``report["seconds_per_item"]`` is the
        model's time per image at that batch size.
        """
        started = time.perf_counter()
        report: dict[str, Any] = {"backend": self.backend.name}
        if self.backend is self.torch_backend and self._channels_last_setting == "auto":
            report["memory_format_ms"] = self._choose_memory_format(min(max_batch_size, 4))
        run = forward_random(self.backend)
        report |= tune_batch_size(run, max_batch_size, tune=tune, unit="images")
        report["seconds"] = round(time.perf_counter() - started, 3)
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
            "input_size": self.preprocess.crop_size,
        }
