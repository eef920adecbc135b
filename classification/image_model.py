"""One image model on one backend: decoding, the backend choice, warm-up. Knows nothing
of HTTP; the classifier and the embedder build on it."""

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classification.backend import Backend, TorchBackend, forward_random, seconds_per_batch
from classification.decode import decode_image
from classification.errors import ImageError
from classification.models import LoadedModel
from classification.onnx_backend import (
    OnnxBackend,
    OnnxUnavailable,
    cached_backend,
    exported_model,
)
from classification.quantize import (
    Int8Recipe,
    QuantizationUnavailable,
    Ranges,
    committed_ranges,
    folder_ranges,
    int8_recipe,
    quantized_model,
    read_ranges,
)
from serving.device import resolve_device
from serving.warmup import batch_shapes, time_batches, tune_batch_size

logger = logging.getLogger(__name__)


class BackendMismatch(Exception):
    """The ONNX model's outputs differ from PyTorch's on the sample image."""


class Int8NotFaster(Exception):
    """The int8 model does not run enough faster than float32 to be worth its error."""


_SAMPLE_IMAGE = Path(__file__).parent / "data" / "sample.jpg"
_AGREEMENT_TOLERANCE = 1e-4
# The photos int8 must agree with float32 on, with their mirror images (see _check_int8).
# The default model's largest probability difference on these is 0.06 with full-range
# weights and 0.100 with 7-bit ones (measured on an Intel Xeon and an AMD EPYC, and the
# same under an emulated AVX2 CPU), and 0.20 on the 200 calibration photos with either.
# A model whose ranges are wrong, or whose sums overflow, is off by 0.5 and more.
_CHECK_PHOTOS = [
    Path(__file__).parent / "data" / name for name in ("sample.jpg", "coffee.jpg", "rocket.jpg")
]
INT8_TOLERANCE = 0.15
# PRECISION=auto serves int8 only when the model alone runs at least this much faster
# than float32 at INT8_TIMING_BATCH: decoding costs the same in both, so the whole server
# gains less than the model.
INT8_MIN_SPEEDUP = 1.3
INT8_TIMING_BATCH = 8


@dataclass(frozen=True)
class Built:
    """What an ImageModel runs on, and why: made once, by ``ImageModel._build``."""

    backend: Backend
    precision: str = "float32"
    precision_reason: str = ""
    backend_fallback_reason: str | None = None  # why not ONNX Runtime, where asked for
    int8_recipe: Int8Recipe | None = None
    int8_speedup: float | None = None  # measured by PRECISION=auto


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

    def _build(
        self,
        device: torch.device,
        backend: str,
        precision: str,
        calibration_dir: Path | None,
        cache_dir: Path,
        threads: int | None,
    ) -> Built:
        """Chooses what to run on: the one place that decides the backend and precision,
        and says why."""
        torch_only = Built(self.torch_backend, precision_reason=f"PRECISION={precision}")
        if backend == "auto":
            backend = "torch" if device.type == "cuda" else "onnxruntime"
        if precision == "int8" and backend != "onnxruntime":
            raise ValueError(
                "PRECISION=int8 runs on ONNX Runtime: use BACKEND=onnxruntime on the CPU, "
                "or PRECISION=float32"
            )
        if backend != "onnxruntime":
            if precision == "auto":
                reason = "PRECISION=auto: int8 is for ONNX Runtime on the CPU"
                return replace(torch_only, precision_reason=reason)
            return torch_only
        if device.type != "cpu":
            raise ValueError("BACKEND=onnxruntime runs on the CPU: use DEVICE=cpu or BACKEND=torch")
        try:
            self._float32 = self._onnx(cache_dir, threads or torch.get_num_threads())
        except (OnnxUnavailable, BackendMismatch, ImportError, OSError) as exc:
            logger.warning("ONNX Runtime is not used, serving with PyTorch: %s", exc)
            fallback = f"{type(exc).__name__}: {exc}"
            reason = (
                torch_only.precision_reason
                if precision == "float32"
                else "int8 runs on ONNX Runtime, which is not used: see backend_fallback_reason"
            )
            return replace(torch_only, backend_fallback_reason=fallback, precision_reason=reason)
        float32 = Built(self._float32, precision_reason=f"PRECISION={precision}")
        if precision == "float32":
            return float32
        return self._int8(float32, precision, calibration_dir, cache_dir)

    def _onnx(self, cache_dir: Path, threads: int) -> OnnxBackend:
        """The float32 ONNX Runtime backend, checked against PyTorch on a photo."""
        onnx = cached_backend(
            lambda: exported_model(
                self.model.module, self.model.name, self.preprocess.crop_size, cache_dir
            ),
            self.preprocess,
            threads,
        )
        self._check_agreement(onnx)
        return onnx

    def _int8(
        self, float32: Built, precision: str, calibration_dir: Path | None, cache_dir: Path
    ) -> Built:
        """The int8 form of ``float32`` when ``precision`` asks for it, the int8 model
        agrees with float32 on the check photos and, for auto, runs at least
        INT8_MIN_SPEEDUP times as fast; else ``float32``, saying why not."""
        onnx = self.float32_onnx()
        recipe = int8_recipe()
        speedup = None
        try:
            ranges = self._int8_ranges(calibration_dir, cache_dir)
            if ranges is None:
                missing = (
                    f"PRECISION={precision} needs calibration images for "
                    f"MODEL={self.model.name}: set CALIBRATION_DIR to a folder of 100-500 "
                    "typical inputs (only the default model's weights come with ranges)"
                )
                if precision == "int8":
                    raise ValueError(missing)
                raise QuantizationUnavailable(missing)
            int8 = cached_backend(
                lambda: quantized_model(onnx.model_path, ranges, cache_dir, recipe),
                self.preprocess,
                onnx.threads,
            )
            agreement = self._check_int8(onnx, int8)
            if precision == "auto":
                speedup = self._speedup(onnx, int8)
                if speedup < INT8_MIN_SPEEDUP:
                    raise Int8NotFaster(
                        f"on this CPU it runs only {speedup:.2f}x as fast as float32 "
                        f"(batch {INT8_TIMING_BATCH}); PRECISION=auto asks for "
                        f"{INT8_MIN_SPEEDUP}x"
                    )
        except (
            QuantizationUnavailable,
            OnnxUnavailable,
            BackendMismatch,
            Int8NotFaster,
            ImportError,
            OSError,
        ) as exc:
            reason = f"int8 is not used: {exc}"
            logger.warning("serving float32: %s", reason)
            return replace(
                float32, precision_reason=reason, int8_recipe=recipe, int8_speedup=speedup
            )
        reason = f"PRECISION={precision}: int8 agrees with float32 on the check photos" + (
            f" ({agreement}) with {recipe.name} weights"
        )
        if speedup is not None:
            reason += f" and runs {speedup:.2f}x as fast (batch {INT8_TIMING_BATCH})"
        return Built(int8, "int8", reason, int8_recipe=recipe, int8_speedup=speedup)

    def _speedup(self, float32: Backend, int8: Backend, rounds: int = 5) -> float:
        """How many times as fast int8 runs batches of INT8_TIMING_BATCH as float32 on
        this CPU. The two are timed in turns, so that load from elsewhere slows both
        alike."""
        runs = {"float32": forward_random(float32), "int8": forward_random(int8)}
        seconds = time_batches(lambda name: runs[name](INT8_TIMING_BATCH), list(runs), rounds)
        return round(seconds["float32"] / seconds["int8"], 2)

    def _int8_ranges(self, calibration_dir: Path | None, cache_dir: Path) -> Ranges | None:
        """The float32 ONNX model's activation ranges: measured on ``calibration_dir``,
        else the committed ones; None when there are none for this model."""
        model_path = self.float32_onnx().model_path
        if calibration_dir is not None:
            return folder_ranges(model_path, calibration_dir, self.calibration_input, cache_dir)
        committed = committed_ranges(model_path)
        return read_ranges(committed) if committed.is_file() else None

    def float32_onnx(self) -> OnnxBackend:
        """The float32 ONNX Runtime backend, which int8 is made from (and may replace)."""
        if self._float32 is None:
            raise RuntimeError("the float32 ONNX Runtime backend is not in use")
        return self._float32

    def calibration_input(self, data: bytes) -> np.ndarray:
        """One image file as the float32 ONNX model's normalised input, for calibration.
        Raises ValueError for a file that does not decode."""
        try:
            pixels = self.prepare(data, max_pixels=10**8)
        except ImageError as exc:
            raise ValueError(str(exc)) from exc
        return self.float32_onnx().inputs(pixels[None])

    def check_photos(self) -> np.ndarray:
        """The shipped photos and their mirror images, as one batch."""
        crops = [self.prepare(path.read_bytes(), max_pixels=10**8) for path in _CHECK_PHOTOS]
        return np.stack(crops + [crop[:, ::-1] for crop in crops])

    def _check_agreement(self, onnx: Backend) -> None:
        pixels = self.prepare(_SAMPLE_IMAGE.read_bytes(), max_pixels=10**8)
        batch = np.stack([pixels, pixels[:, ::-1]])
        expected = self._compare(self.torch_backend.forward(batch))
        difference = float((self._compare(onnx.forward(batch)) - expected).abs().max())
        if difference > _AGREEMENT_TOLERANCE:
            raise BackendMismatch(
                f"ONNX and PyTorch outputs differ by {difference:.2e} on {_SAMPLE_IMAGE.name}"
            )

    def _check_int8(self, float32: Backend, int8: Backend) -> str:
        """How int8's outputs agree with float32's on the check photos; raises
        BackendMismatch unless ``int8_agreement`` accepts them."""
        batch = self.check_photos()
        good, agreement = self.int8_agreement(float32.forward(batch), int8.forward(batch))
        if not good:
            raise BackendMismatch(f"int8 disagrees with float32 on the check photos: {agreement}")
        return agreement

    def int8_agreement(self, expected: torch.Tensor, actual: torch.Tensor) -> tuple[bool, str]:
        """Whether the int8 outputs ``actual`` are close enough to the float32 outputs
        ``expected``, and the figures. Here: outputs through ``compare`` within
        INT8_TOLERANCE. Tasks override it with what matters to them."""
        difference = float((self._compare(actual) - self._compare(expected)).abs().max())
        return (
            difference <= INT8_TOLERANCE,
            f"outputs within {difference:.3f} (bound {INT8_TOLERANCE})",
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
        data = _SAMPLE_IMAGE.read_bytes()
        best = math.inf
        for _ in range(rounds):
            started = time.perf_counter()
            self.prepare(data, max_pixels=10**8)
            best = min(best, time.perf_counter() - started)
        return round(best, 6)

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
