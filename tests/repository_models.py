"""Model repositories for the tests, built from real exports: small tensor models as ONNX
and TorchScript, and the default model as an image model (examples/model_repository)."""

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from examples.model_repository import build

# A tensor model's config: two inputs, two outputs, batched.
TWO_BY_TWO_CONFIG = """
name: "{name}"
platform: "{platform}"
max_batch_size: 16
input [
  {{ name: "a" data_type: TYPE_FP32 dims: [ 4 ] }},
  {{ name: "b" data_type: TYPE_FP32 dims: [ 4 ] }}
]
output [
  {{ name: "sum" data_type: TYPE_FP32 dims: [ 4 ] }},
  {{ name: "mixed" data_type: TYPE_FP32 dims: [ 3 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""


class TwoByTwo(nn.Module):
    """``a + b`` and ``(a * b) @ weight * scale``: two inputs, two outputs."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.weight = nn.Parameter(torch.randn(4, 3, generator=generator))
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, (a * b) @ self.weight * self.scale

    def expected(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The outputs, computed directly by the module."""
        with torch.no_grad():
            total, mixed = self(torch.from_numpy(a), torch.from_numpy(b))
        return total.numpy(), mixed.numpy()


def export_onnx(module: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = (torch.zeros(2, 4), torch.zeros(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            sample,
            str(path),
            dynamo=False,
            input_names=["a", "b"],
            output_names=["sum", "mixed"],
            dynamic_axes={name: {0: "batch"} for name in ("a", "b", "sum", "mixed")},
            opset_version=17,
        )
    return path


def export_torchscript(module: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated, and still what Triton loads
        torch.jit.script(module.eval()).save(str(path))
    return path


def onnx_model(root: Path, name: str, *, config: bool, versions: dict[int, float]) -> None:
    """An ONNX TwoByTwo at each version, scaled by its value; with or without a config."""
    for version, scale in versions.items():
        export_onnx(TwoByTwo(scale), root / name / str(version) / "model.onnx")
    if config:
        text = TWO_BY_TWO_CONFIG.format(name=name, platform="onnxruntime_onnx")
        (root / name / "config.pbtxt").write_text(text)


def torchscript_model(root: Path, name: str) -> None:
    export_torchscript(TwoByTwo(), root / name / "1" / "model.pt")
    text = TWO_BY_TWO_CONFIG.format(name=name, platform="pytorch_libtorch")
    (root / name / "config.pbtxt").write_text(text)


def image_model(root: Path, cache_dir: Path) -> Path:
    """The default model, float32 ONNX, with its preprocessing and labels declared."""
    return build(root, cache_dir)
