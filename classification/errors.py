"""Errors about an input image, each with the HTTP status it fails its request with."""

from serving.task import InputError


class ImageError(InputError):
    """Base class: the input cannot be classified. The message says why."""


class BadImage(ImageError):
    """The bytes claim to be an image but are corrupt, truncated or empty."""

    status = 400
    advice = "; check that the file is a complete image"


class UnsupportedImage(ImageError):
    """The bytes are not an image in one of the accepted formats or pixel modes."""

    status = 415


class ImageTooLarge(ImageError):
    """The image has more pixels than the configured limit."""

    status = 413
    advice = "; send a smaller image"
