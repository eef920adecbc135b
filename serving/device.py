"""Where the tasks compute: DEVICE, resolved once for all of them, and the threads the
computing library may use. PyTorch is optional here: without it, tasks run on the CPU."""

from types import ModuleType


def _torch() -> ModuleType | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def resolve_device(requested: str) -> str:
    """DEVICE (auto, cpu, cuda, cuda:N) as the device to use, or ValueError naming it."""
    torch = _torch()
    if torch is None:
        if requested not in ("auto", "cpu"):
            raise ValueError(f"DEVICE={requested!r} needs PyTorch with CUDA: use cpu or auto")
        return "cpu"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"DEVICE={requested!r} but CUDA is not available: use cpu or auto")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"DEVICE={requested!r} but only {torch.cuda.device_count()} CUDA devices exist"
            )
    return str(device)


def device_type(device: str) -> str:
    """``cuda`` for ``cuda:1``."""
    return device.partition(":")[0]


def limit_threads(threads: int) -> None:
    """Caps the threads PyTorch computes with in this process, if it is installed."""
    if (torch := _torch()) is not None:
        torch.set_num_threads(threads)
