"""Typed errors shared by every reefcap component.

Each error carries a short machine-readable ``code`` so the server can turn it into a JSON 4xx body and
the CLI into a one-line message, without either of them matching on message text.
"""

from __future__ import annotations


class ReefcapError(Exception):
    """Base class for errors that are the caller's to fix (bad input, missing model), not bugs."""

    code = "reefcap_error"


class ModelNotFoundError(ReefcapError):
    """A model name, directory or hub id did not resolve to a loadable checkpoint."""

    code = "model_not_found"


class ModelLoadError(ReefcapError):
    """A checkpoint was found but could not be loaded (corrupt, incomplete or not a BLIP captioner)."""

    code = "model_load_failed"


class InvalidOptionsError(ReefcapError, ValueError):
    """A setting out of range: decoding options, a batch size, a device string.

    Also a ``ValueError``, which these checks raised before they had a type, so callers that catch that
    still do; the CLI reports it as a usage error and the server as a 422.
    """

    code = "invalid_options"


class ImageError(ReefcapError, ValueError):
    """Base class for an input that cannot be captioned as an image."""

    code = "bad_image"


class NotAnImageError(ImageError):
    """The bytes are not an image format reefcap can decode."""

    code = "not_an_image"


class ImageNotFoundError(NotAnImageError):
    """The path names no file. A NotAnImageError subclass so existing ``except NotAnImageError`` still catch it."""

    code = "not_found"


class TruncatedImageError(ImageError):
    """The image header was readable but its pixel data is cut short or corrupt."""

    code = "truncated_image"


class ImageTooLargeError(ImageError):
    """The image exceeds the configured byte or pixel limit (this guards against decompression bombs)."""

    code = "image_too_large"


class UnsupportedImageFormatError(ImageError):
    """The image decodes, but its format is not in the allowed list."""

    code = "unsupported_format"
