"""What runs a repository model's file: ONNX Runtime for ``model.onnx``, PyTorch for a
TorchScript ``model.pt``. Each takes a batch as named arrays and gives the outputs named."""

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from repository.layout import ModelLoadError

# ONNX's element types, as the protocol names them.
ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class FileTensor:
    """An input or output as the model file declares it: each dimension a size, or -1
    where the file leaves it free (a symbolic or unknown dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Runner(Protocol):
    # How many calls of ``run`` are worth making at once, from as many threads.
    concurrency: int

    def signature(self) -> tuple[list[FileTensor], list[FileTensor]] | None:
        """The inputs and outputs the file declares, or None if it does not say."""
        ...

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """The ``outputs`` named, in order, for the batch ``feeds``."""
        ...

    def side_by_side(self) -> AbstractContextManager[None]:
        """Inside, calls run as they do under load, ``concurrency`` at once."""
        ...


class OnnxRunner:
    def __init__(self, path: Path, threads: int, device: str = "cpu") -> None:
        from classification.onnx_backend import OnnxUnavailable, Sessions, providers_for

        try:
            self.sessions = Sessions(path, threads, tuple(providers_for(device)))
        except OnnxUnavailable as exc:
            raise ModelLoadError(str(exc)) from None
        self.concurrency = self.sessions.concurrency
        self.side_by_side = self.sessions.side_by_side

    def signature(self) -> tuple[list[FileTensor], list[FileTensor]]:
        session = self.sessions.alone
        return (
            [_file_tensor(arg) for arg in session.get_inputs()],
            [_file_tensor(arg) for arg in session.get_outputs()],
        )

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.sessions.run(outputs, feeds)


def _file_tensor(arg: Any) -> FileTensor:
    datatype = ONNX_TYPES.get(arg.type)
    if datatype is None:
        raise ValueError(f"{arg.name!r} has type {arg.type}, which this server does not serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return FileTensor(arg.name, datatype, shape)


class TorchScriptRunner:
    """A TorchScript module, called with the inputs in the config's order; its result
    (a tensor, or a tuple or list of them) holds the outputs in the config's order."""

    concurrency = 1  # its threads are the process's: calls side by side would share them

    def __init__(self, path: Path, device: str, inputs: list[str], outputs: list[str]) -> None:
        import torch

        try:
            with warnings.catch_warnings():
                # Deprecated in PyTorch 2.14, and still the format Triton's repositories hold.
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
            self.module = module.eval()
        except Exception as exc:  # torch raises RuntimeError and others for a bad archive
            raise ModelLoadError(
                f"PyTorch cannot load {path} as TorchScript: {type(exc).__name__}: {exc}"
            ) from None
        self.device = torch.device(device)
        self.inputs = inputs
        self.outputs = outputs

    def signature(self) -> None:
        return None

    def side_by_side(self) -> AbstractContextManager[None]:
        return nullcontext()

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(feeds[name]).to(self.device) for name in self.inputs]
            result = self.module(*args)
        values = list(result) if isinstance(result, tuple | list) else [result]
        if len(values) != len(self.outputs):
            raise ValueError(
                f"the module returned {len(values)} outputs; the config declares"
                f" {len(self.outputs)}"
            )
        by_name = dict(zip(self.outputs, values, strict=True))
        return [by_name[name].detach().cpu().numpy() for name in outputs]
