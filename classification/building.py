"""How an image model chooses what it runs on: ONNX Runtime where it agrees with PyTorch,
int8 where it agrees with float32 (and, for PRECISION=auto, is fast enough), and why
not otherwise. ``ImageModel`` builds on this; the result is one ``Built`` value."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from classification.backend import Backend, TorchBackend, forward_random
from classification.errors import ImageError
from classification.models import LoadedModel
from classification.onnx_backend import (
    OnnxBackend,
    OnnxUnavailable,
    cached_backend,
    exported_model,
)
from classification.preprocess import Preprocess
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
from serving.warmup import time_batches

logger = logging.getLogger(__name__)


class BackendMismatch(Exception):
    """The ONNX model's outputs differ from PyTorch's on the sample image."""


class Int8NotFaster(Exception):
    """The int8 model does not run enough faster than float32 to be worth its error."""


SAMPLE_IMAGE = Path(__file__).parent / "data" / "sample.jpg"
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


class Building:
    """The part of ImageModel that chooses its backend and precision (``_build``)."""

    model: LoadedModel
    preprocess: Preprocess
    torch_backend: TorchBackend
    cache_dir: Path
    _compare: Callable[[torch.Tensor], torch.Tensor]
    _float32: OnnxBackend | None

    def prepare(self, data: bytes, *, max_pixels: int) -> np.ndarray:
        raise NotImplementedError

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
        pixels = self.prepare(SAMPLE_IMAGE.read_bytes(), max_pixels=10**8)
        batch = np.stack([pixels, pixels[:, ::-1]])
        expected = self._compare(self.torch_backend.forward(batch))
        difference = float((self._compare(onnx.forward(batch)) - expected).abs().max())
        if difference > _AGREEMENT_TOLERANCE:
            raise BackendMismatch(
                f"ONNX and PyTorch outputs differ by {difference:.2e} on {SAMPLE_IMAGE.name}"
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
