"""ONNX Runtime inference on the CPU, from a PyTorch model exported once and cached."""

import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from classification.preprocess import Preprocess

logger = logging.getLogger(__name__)

OPSET = 17


class OnnxUnavailable(Exception):
    """This model cannot be served with ONNX Runtime; the message says why."""


def weights_digest(module: nn.Module) -> str:
    """A hash of every tensor in the state dict: equal weights, equal digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def exported_model(module: nn.Module, name: str, crop_size: int, cache_dir: Path) -> Path:
    """The ONNX file for ``module``, exported with a dynamic batch axis on first use and
    reused afterwards: the cache key is the model name and a hash of its weights."""
    path = cache_dir / f"{name}-{weights_digest(module)}-opset{OPSET}.onnx"
    if path.is_file():
        logger.info("using the cached ONNX export %s", path)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed, so a crash never leaves a half-written file in the cache.
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    sample = torch.zeros(2, 3, crop_size, crop_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter
            torch.onnx.export(
                module.eval(),
                (sample,),
                partial,
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=OPSET,
            )
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise OnnxUnavailable(
            f"{name} does not export to ONNX: {type(exc).__name__}: {exc}"
        ) from exc
    partial.replace(path)
    logger.info("exported %s to %s", name, path)
    return path


def cached_backend(
    build: Callable[[], Path], preprocess: Preprocess, threads: int
) -> "OnnxBackend":
    """An ONNX Runtime session on the model file that ``build`` returns from its cache
    (making it when absent). A cached file that ONNX Runtime cannot load (truncated,
    corrupt, from an incompatible version) is deleted and built again, once."""
    path = build()
    try:
        return OnnxBackend(path, preprocess, threads)
    except OnnxUnavailable as exc:
        logger.warning("the cached model %s is unusable, making it again: %s", path.name, exc)
        path.unlink(missing_ok=True)
    return OnnxBackend(build(), preprocess, threads)


class OnnxBackend:
    """ONNX Runtime on the CPU. Normalisation happens in NumPy, on the way in. Up to
    ``concurrency`` calls of ``forward`` may run at once, from as many threads (see
    ``Sessions``)."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, preprocess: Preprocess, threads: int) -> None:
        self.sessions = Sessions(model_path, threads)
        self.session = self.sessions.alone
        self.concurrency = self.sessions.concurrency
        self.device = torch.device("cpu")
        self.threads = threads
        self.preprocess = preprocess
        self.model_path = model_path
        self._mean = np.array(preprocess.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._scale = 1 / np.array(preprocess.std, dtype=np.float32).reshape(1, 3, 1, 1)
        self._output = self.session.get_outputs()[0].name
        self.side_by_side = self.sessions.side_by_side

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        """The model's normalised float32 NCHW input for a uint8 NHWC batch."""
        # In place, one pass each: about 9x faster than the same arithmetic on temporaries.
        inputs = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
        np.copyto(inputs, pixels.transpose(0, 3, 1, 2))
        inputs -= self._mean
        inputs *= self._scale
        return inputs

    def forward(self, pixels: np.ndarray) -> torch.Tensor:
        [outputs] = self.sessions.run([self._output], {"input": self.inputs(pixels)})
        return torch.from_numpy(outputs)


class Sessions:
    """Two ONNX Runtime sessions on one model file, for up to ``concurrency`` calls at
    once from as many threads. A call that runs alone uses every one of ``threads``;
    one that starts while another runs uses a single-threaded session beside it. Under
    load the model so runs as single-threaded calls side by side, which on 2 cores
    compute 10-40% more images per second than calls that split each layer between
    threads and wait for the slowest."""

    def __init__(
        self, model_path: Path, threads: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)
    ) -> None:
        self.alone = onnx_session(model_path, threads, providers)
        self.beside = onnx_session(model_path, 1, providers) if threads > 1 else self.alone
        self.concurrency = threads
        self._running = 0
        self._lock = threading.Lock()

    @contextmanager
    def side_by_side(self) -> Iterator[None]:
        """Inside, every call runs on the single-threaded session, as under load."""
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[Any]:
        """``session.run`` on whichever session is free: the outputs named, in order."""
        with self._lock:
            session = self.beside if self._running else self.alone
            self._running += 1
        try:
            return list(session.run(outputs, feeds))
        finally:
            with self._lock:
                self._running -= 1


def providers_for(device: str) -> list[str]:
    """ONNX Runtime's execution providers for DEVICE: CUDA's first on a GPU, when this
    onnxruntime has it (the onnxruntime-gpu package), and the CPU's always."""
    import onnxruntime

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        logger.warning(
            "DEVICE=%s but this onnxruntime has no CUDA provider (install onnxruntime-gpu);"
            " ONNX models run on the CPU",
            device,
        )
    return ["CPUExecutionProvider"]


def onnx_session(
    model_path: Path, threads: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads sleep instead of spinning: the decode threads need the
    # cores between batches (on 2 cores, 20-30% more images per second under load).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(model_path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime's error classes derive from Exception
        raise OnnxUnavailable(
            f"ONNX Runtime cannot load {model_path}: {type(exc).__name__}: {exc}"
        ) from exc
