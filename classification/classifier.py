"""Image classification: bytes in, top-k classes out. Knows nothing of HTTP."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from classification.building import INT8_TOLERANCE
from classification.image_model import ImageModel
from classification.models import LoadedModel


@dataclass(frozen=True, slots=True)
class ClassifyInput:
    """One decoded, cropped image waiting for the model, and how many classes to return."""

    pixels: np.ndarray
    top_k: int


@dataclass(frozen=True, slots=True)
class ClassScore:
    class_id: int
    label: str
    score: float


class Classifier(ImageModel):
    """Decodes images and classifies batches of them with one model."""

    def __init__(self, model: LoadedModel, **options: Any) -> None:
        """Takes the options of ``ImageModel``; ONNX Runtime must agree with PyTorch on
        the class probabilities."""
        super().__init__(model, compare=lambda logits: logits.softmax(dim=1), **options)
        self.labels = model.labels

    def int8_agreement(self, expected: torch.Tensor, actual: torch.Tensor) -> tuple[bool, str]:
        """Probabilities within INT8_TOLERANCE, and each top class one that float32 scores
        within INT8_TOLERANCE of its own top: int8 may swap a near tie (as float32 on
        another CPU may), never pick a class float32 rejects."""
        expected, actual = expected.softmax(dim=1), actual.softmax(dim=1)
        difference = float((actual - expected).abs().max())
        picked = expected.gather(1, actual.argmax(dim=1, keepdim=True)).squeeze(1)
        shortfall = float((expected.max(dim=1).values - picked).max())
        return max(difference, shortfall) <= INT8_TOLERANCE, (
            f"probabilities within {difference:.3f}, top classes within {shortfall:.3f} of "
            f"float32's top (bound {INT8_TOLERANCE})"
        )

    def predict(self, batch: Sequence[ClassifyInput]) -> list[list[ClassScore]]:
        """Classifies a batch in one forward pass; one top-k list per input, in order."""
        pixels = np.stack([item.pixels for item in batch])
        probabilities = self.backend.forward(pixels).softmax(dim=1)
        k = min(max(item.top_k for item in batch), probabilities.shape[1])
        scores, class_ids = probabilities.topk(k, dim=1)
        return [
            [
                ClassScore(class_id, self.labels[class_id], score)
                for class_id, score in list(zip(row_ids, row_scores, strict=True))[: item.top_k]
            ]
            for item, row_scores, row_ids in zip(
                batch, scores.tolist(), class_ids.tolist(), strict=True
            )
        ]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_labels": len(self.labels)}
