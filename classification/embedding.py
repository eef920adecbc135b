"""Image embeddings: the pooled features a classifier computes before its head."""

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from classification.image_model import ImageModel
from classification.models import LoadedModel


def backbone(model: LoadedModel) -> LoadedModel:
    """``model`` without its classifier head: its last linear layer becomes the identity,
    so the output is the pooled features the head would have read."""
    module = copy.deepcopy(model.module)
    parent, name = _last_linear(module)
    setattr(parent, name, nn.Identity())
    return replace(model, name=f"{model.name}-features", module=module.eval())


def _last_linear(module: nn.Module) -> tuple[nn.Module, str]:
    found: tuple[nn.Module, str] | None = None
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, name)
    if found is None:
        raise ValueError(f"{type(module).__name__} has no linear classifier head to remove")
    return found


# The default model's int8 features are at least 0.986 from float32's on the check photos.
INT8_MIN_COSINE = 0.98


def normalize(outputs: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(outputs.flatten(1), dim=1)


class Embedder(ImageModel):
    """Turns batches of images into unit-length feature vectors."""

    def __init__(self, model: LoadedModel, **options: Any) -> None:
        """Takes a classifier and the options of ``ImageModel``; ONNX Runtime must agree
        with PyTorch on the normalised vectors."""
        parent, name = _last_linear(model.module)
        self.dimensions: int = getattr(parent, name).in_features
        super().__init__(backbone(model), compare=normalize, **options)

    def int8_agreement(self, expected: torch.Tensor, actual: torch.Tensor) -> tuple[bool, str]:
        """Each int8 vector's cosine similarity with float32's at least INT8_MIN_COSINE
        (a photo and its mirror image are about 0.96-0.99 apart)."""
        cosine = float((normalize(expected) * normalize(actual)).sum(dim=1).min())
        return cosine >= INT8_MIN_COSINE, (
            f"cosine similarity at least {cosine:.4f} (bound {INT8_MIN_COSINE})"
        )

    def predict(self, batch: Sequence[np.ndarray]) -> list[list[float]]:
        """One L2-normalised vector per image, in order."""
        vectors = normalize(self.backend.forward(np.stack(list(batch))))
        return [[round(v, 6) for v in row] for row in vectors.tolist()]
