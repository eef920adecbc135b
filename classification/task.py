"""The image tasks: ``POST /cls`` (classification) and ``POST /embed`` (embeddings)."""

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field

from classification import decode
from classification.classifier import Classifier, ClassifyInput, ClassScore
from classification.embedding import Embedder
from classification.image_model import ImageModel
from classification.images import IMAGE_JSON_SCHEMA, image_bytes, image_text
from classification.models import LoadedModel, load_model
from classification.settings import ClassificationSettings, ImageSettings
from serving.task import LoadContext, Payload, Task, TaskSettings
from serving.tensors import TensorForm, TensorSpec, text_tensor


def image_model_options(settings: ImageSettings, context: LoadContext) -> dict[str, Any]:
    """The ImageModel options that settings choose. Also sizes the process's decode
    budget (MAX_DECODE_PIXELS), before the first decode."""
    decode.size_budget(settings.max_decode_pixels)
    return {
        "device": context.device,
        "channels_last": settings.channels_last,
        "backend": settings.backend,
        "dtype": settings.dtype,
        "precision": settings.precision,
        "calibration_dir": settings.calibration_dir,
        "cache_dir": context.cache_dir,
        "threads": context.threads,
    }


class ImageTask:
    """What the image tasks share: their settings (MODEL, WEIGHTS, ...), decoding within
    MAX_IMAGE_PIXELS, warm-up on the backend."""

    Settings: ClassVar[type[TaskSettings]] = ImageSettings
    jobs_field: ClassVar[str] = "images"
    json_schema: ClassVar[dict[str, Any] | None] = IMAGE_JSON_SCHEMA
    settings: ImageSettings
    model: ImageModel

    def load_model(self, context: LoadContext) -> tuple[LoadedModel, dict[str, Any]]:
        """MODEL with WEIGHTS, and the ImageModel options the settings choose."""
        settings = self.settings
        return load_model(settings.model, settings.weights), image_model_options(settings, context)

    def check_item(self, value: Any) -> None:
        image_text(value)

    def prepare(self, payload: Payload) -> np.ndarray:
        return self.model.prepare(image_bytes(payload), max_pixels=self.settings.max_image_pixels)

    def warm_up(self, max_batch_size: int, tune: bool) -> dict[str, Any]:
        return self.model.warmup(max_batch_size, tune=tune)

    def concurrency(self) -> int:
        return self.model.concurrency

    def light_model(self) -> bool:
        return self.model.precision == "int8"

    def describe(self) -> dict[str, Any]:
        return self.model.describe()

    # Over the Open Inference Protocol, one encoded image (any format /cls takes) per row.
    IMAGE_INPUT = TensorSpec("image", "BYTES", (-1, 1))


class ClassPrediction(BaseModel):
    class_id: int
    label: str
    score: float


class Classification(BaseModel):
    prediction: ClassPrediction
    top_k: list[ClassPrediction]

    @classmethod
    def from_scores(cls, scores: list[ClassScore]) -> "Classification":
        ranked = [
            ClassPrediction(class_id=s.class_id, label=s.label, score=s.score) for s in scores
        ]
        return cls(prediction=ranked[0], top_k=ranked)


class ClassifyOptions(BaseModel):
    top_k: int | None = Field(None, ge=1, le=20, description="Classes to return (TOP_K)")


class ImageClassification(ImageTask, Task[ClassifyInput, list[ClassScore]]):
    """Top-k ImageNet classes (or those of MODEL) for one image."""

    name = "cls"
    Settings = ClassificationSettings
    Options = ClassifyOptions
    Response = Classification
    settings: ClassificationSettings

    def load(self, context: LoadContext) -> None:
        self.top_k = self.settings.top_k
        loaded, options = self.load_model(context)
        self.model = self.classifier = Classifier(loaded, **options)

    def decode(self, payload: Payload, options: ClassifyOptions) -> ClassifyInput:
        return ClassifyInput(self.prepare(payload), options.top_k or self.top_k)

    def predict_batch(self, items: list[ClassifyInput]) -> list[list[ClassScore] | Exception]:
        return list(self.classifier.predict(items))

    def encode(self, result: list[ClassScore], options: ClassifyOptions) -> Classification:
        return Classification.from_scores(result)

    def tensor_form(self) -> TensorForm:
        return TensorForm(
            inputs=(self.IMAGE_INPUT,),
            outputs=(  # [rows, top_k], best first
                TensorSpec("label", "BYTES", (-1, -1)),
                TensorSpec("class_id", "INT64", (-1, -1)),
                TensorSpec("score", "FP32", (-1, -1)),
            ),
        )

    def tensor_outputs(
        self, results: list[list[ClassScore]], options: ClassifyOptions
    ) -> dict[str, np.ndarray]:
        return {
            "label": text_tensor([[s.label for s in scores] for scores in results]),
            "class_id": np.array([[s.class_id for s in scores] for scores in results], np.int64),
            "score": np.array([[s.score for s in scores] for scores in results], np.float32),
        }

    def classification(self, result: list[ClassScore], count: int) -> list[str]:
        return [f"{s.score:f}:{s.class_id}:{s.label}" for s in result[:count]]


class Embedding(BaseModel):
    embedding: list[float] = Field(description="L2-normalised: a dot product is the cosine")
    dimensions: int


class ImageEmbedding(ImageTask, Task[np.ndarray, list[float]]):
    """The pooled features of MODEL before its classifier head, L2-normalised, for
    similarity search and near-duplicate detection."""

    name = "embed"
    Response = Embedding

    def load(self, context: LoadContext) -> None:
        loaded, options = self.load_model(context)
        self.model = self.embedder = Embedder(loaded, **options)

    def decode(self, payload: Payload, options: BaseModel) -> np.ndarray:
        return self.prepare(payload)

    def predict_batch(self, items: list[np.ndarray]) -> list[list[float] | Exception]:
        return list(self.embedder.predict(items))

    def encode(self, result: list[float], options: BaseModel) -> Embedding:
        return Embedding(embedding=result, dimensions=len(result))

    def tensor_form(self) -> TensorForm:
        return TensorForm(
            inputs=(self.IMAGE_INPUT,),
            outputs=(TensorSpec("embedding", "FP32", (-1, self.embedder.dimensions)),),
        )

    def tensor_outputs(
        self, results: list[list[float]], options: BaseModel
    ) -> dict[str, np.ndarray]:
        return {"embedding": np.array(results, dtype=np.float32)}
