"""DEVICE, resolved once for every task (serving/device.py), with PyTorch and without."""

import pytest
import torch

from serving import device
from serving.device import device_type, resolve_device


def test_auto_is_cuda_only_where_cuda_is() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    assert device_type("cuda:1") == "cuda"
    assert device_type("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_names_the_setting() -> None:
    with pytest.raises(ValueError, match="DEVICE='cuda' but CUDA is not available"):
        resolve_device("cuda")


def test_without_pytorch_tasks_run_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_torch", lambda: None)
    assert resolve_device("auto") == "cpu"
    device.limit_threads(2)  # nothing to limit
    with pytest.raises(ValueError, match="needs PyTorch"):
        resolve_device("cuda:0")
