"""Errors about an input image. The HTTP layer maps each to a status code."""


class ImageError(Exception):
    """Base class: the input cannot be classified. The message says why."""


class BadImage(ImageError):
    """The bytes claim to be an image but are corrupt, truncated or empty."""


class UnsupportedImage(ImageError):
    """The bytes are not an image in one of the accepted formats or pixel modes."""


class ImageTooLarge(ImageError):
    """The image has more pixels than the configured limit."""
