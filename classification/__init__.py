"""Image classification: decoding, preprocessing, models and batched prediction."""

from classification.classifier import Classifier, ClassifyInput, ClassScore
from classification.errors import BadImage, ImageError, ImageTooLarge, UnsupportedImage
from classification.models import DEFAULT_MODEL, LoadedModel, check_model_name, load_model

__all__ = [
    "DEFAULT_MODEL",
    "BadImage",
    "ClassScore",
    "Classifier",
    "ClassifyInput",
    "ImageError",
    "ImageTooLarge",
    "LoadedModel",
    "UnsupportedImage",
    "check_model_name",
    "load_model",
]
