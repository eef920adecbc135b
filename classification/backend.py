"""Inference backends: a uint8 NHWC batch in, class probabilities out.

``TorchBackend`` here, ``OnnxBackend`` in onnx_backend.py; the seam is ``Backend``.
"""

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from classification.preprocess import Preprocess


class Backend(Protocol):
    name: str
    device: torch.device
    preprocess: Preprocess

    def probabilities(self, pixels: np.ndarray) -> torch.Tensor:
        """Softmax scores, shape (N, classes), on the CPU, for a uint8 (N, H, W, 3) batch."""
        ...


def resolve_device(requested: str) -> torch.device:
    """Maps DEVICE (auto, cpu, cuda, cuda:N) to a device, or raises ValueError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"DEVICE={requested!r} but CUDA is not available: use cpu or auto")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"DEVICE={requested!r} but only {torch.cuda.device_count()} CUDA devices exist"
            )
    return device


class TorchBackend:
    """PyTorch eager inference. The batch stays uint8 until it reaches the device."""

    name = "torch"

    def __init__(
        self,
        module: nn.Module,
        preprocess: Preprocess,
        device: torch.device,
        channels_last: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype != torch.float32 and device.type != "cuda":
            raise ValueError(f"DTYPE={str(dtype).removeprefix('torch.')} needs DEVICE=cuda")
        self.device = device
        self.dtype = dtype
        self.preprocess = preprocess
        self.module = module.to(device=device, dtype=dtype)
        self.channels_last = False
        self.set_channels_last(channels_last)

    def set_channels_last(self, enabled: bool) -> None:
        layout = torch.channels_last if enabled else torch.contiguous_format
        self.module.to(memory_format=layout)
        self.channels_last = enabled

    def probabilities(self, pixels: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        inputs = self.preprocess.normalize(batch, self.dtype)
        if not self.channels_last:
            inputs = inputs.contiguous()
        with torch.inference_mode():
            logits = self.module(inputs)
        probabilities: torch.Tensor = logits.float().softmax(dim=1).cpu()
        return probabilities


def seconds_per_batch(
    backend: Backend, batch_sizes: Sequence[int], rounds: int = 5
) -> dict[int, float]:
    """Best-of-``rounds`` wall time of one forward pass per batch size, on random pixels,
    after one untimed pass per size (which also warms up that shape). Each round times
    every size once, so a burst of load from elsewhere slows all sizes alike rather than
    skewing the comparison between them."""
    size = backend.preprocess.crop_size
    rng = np.random.default_rng(0)
    batches = {n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in batch_sizes}
    for pixels in batches.values():
        backend.probabilities(pixels)
    best = dict.fromkeys(batches, float("inf"))
    for _ in range(rounds):
        for n, pixels in batches.items():
            started = time.perf_counter()
            backend.probabilities(pixels)
            if backend.device.type == "cuda":
                torch.cuda.synchronize(backend.device)
            best[n] = min(best[n], time.perf_counter() - started)
    return best
