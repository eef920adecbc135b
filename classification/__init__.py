"""Image tasks: decoding, preprocessing, models, classification and embeddings."""

from classification.building import BackendMismatch
from classification.classifier import Classifier, ClassifyInput, ClassScore
from classification.embedding import Embedder
from classification.errors import BadImage, ImageError, ImageTooLarge, UnsupportedImage
from classification.image_model import ImageModel
from classification.models import DEFAULT_MODEL, LoadedModel, check_model_name, load_model

__all__ = [
    "DEFAULT_MODEL",
    "BackendMismatch",
    "BadImage",
    "ClassScore",
    "Classifier",
    "ClassifyInput",
    "Embedder",
    "ImageError",
    "ImageModel",
    "ImageTooLarge",
    "LoadedModel",
    "UnsupportedImage",
    "check_model_name",
    "load_model",
]
