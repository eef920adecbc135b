"""Inference backends: a uint8 NHWC batch in, the model's outputs out.

``TorchBackend`` here, ``OnnxBackend`` in onnx_backend.py; the seam is ``Backend``.
"""

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from classification.preprocess import Preprocess
from serving.warmup import time_batches


class Backend(Protocol):
    name: str
    device: torch.device
    preprocess: Preprocess
    # How many calls of forward are worth making at once, from as many threads.
    concurrency: int

    def forward(self, pixels: np.ndarray) -> torch.Tensor:
        """The model's float32 outputs, shape (N, ...), on the CPU, for a uint8
        (N, H, W, 3) batch."""
        ...


class TorchBackend:
    """PyTorch eager inference. The batch stays uint8 until it reaches the device."""

    name = "torch"
    concurrency = 1  # its threads are the process's: calls side by side would share them

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

    def forward(self, pixels: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        inputs = self.preprocess.normalize(batch, self.dtype)
        if not self.channels_last:
            inputs = inputs.contiguous()
        with torch.inference_mode():
            outputs: torch.Tensor = self.module(inputs).float().cpu()
        return outputs


def forward_random(backend: Backend) -> Callable[[int], None]:
    """``run(n)``: one forward pass of a batch of ``n`` random images, waited for on a
    GPU, as the warm-up and its timings need. Each batch size's pixels are made once."""
    size = backend.preprocess.crop_size
    rng = np.random.default_rng(0)
    batches: dict[int, np.ndarray] = {}

    def run(n: int) -> None:
        if n not in batches:
            batches[n] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        backend.forward(batches[n])
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)

    return run


def seconds_per_batch(
    backend: Backend, batch_sizes: Sequence[int], rounds: int = 5
) -> dict[int, float]:
    """Best-of-``rounds`` wall time of one forward pass per batch size, on random pixels
    (see ``serving.warmup.time_batches``)."""
    return time_batches(forward_random(backend), batch_sizes, rounds)
