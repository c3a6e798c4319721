"""Image decoding shared by every engine and entrypoint.

Everything that reaches a model passes through :func:`load_image`, so the CLI, the batch captioner and
the server reject the same inputs with the same typed errors, and every model sees an 8-bit RGB image
the right way up.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from reefcap.models.errors import (
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageFormatError,
)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "MPO")

# The file names taken as images when a folder is walked (the batch CLI, `reefcap agreement`).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})


def images_under(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, sorted (empty when there are none)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass(frozen=True)
class ImageLimits:
    """What an input may be: encoded size, decoded pixel count and container format."""

    max_bytes: int = 32 * 1024 * 1024
    # 40 MP covers full-frame survey cameras; PIL's own bomb warning starts at ~89 MP.
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = field(default=DEFAULT_FORMATS)


def _read_bytes(source: str | os.PathLike, limits: ImageLimits) -> bytes:
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageNotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        raise NotAnImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.is_dir():
        raise NotAnImageError(f"{path}: is a directory, not an image")
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"{path}: {size} bytes exceeds the limit of {limits.max_bytes} bytes")
    try:
        return path.read_bytes()
    except OSError as exc:  # e.g. no read permission: an error for this input, not a crash of the batch
        raise NotAnImageError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without the surprises of a bare ``convert('RGB')``."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and 32-bit greyscale: rescale the real range instead of clipping everything above 255 white.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
            lo, hi = 0.0, 65535.0  # a 16-bit sensor range: keep absolute brightness
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        # Palette images may carry transparency; route them through RGBA so it is composited, not dropped.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_image(source: ImageSource, limits: ImageLimits | None = None, name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes or a PIL image) to an upright 8-bit RGB PIL image.

    EXIF orientation is applied; greyscale, palette, alpha and 16-bit images are converted.

    Raises:
        ImageNotFoundError: the path names no file (code ``not_found``).
        NotAnImageError: the bytes are not a decodable image.
        TruncatedImageError: the pixel data is cut short or corrupt.
        ImageTooLargeError: the encoded size or pixel count is over ``limits``.
        UnsupportedImageFormatError: the format is not in ``limits.formats``.
    """
    limits = limits or ImageLimits()
    if isinstance(source, Image.Image):
        label = name or "image"
        w, h = source.size
        if w * h > limits.max_pixels:
            raise ImageTooLargeError(f"{label}: {w}x{h} pixels exceeds the limit of {limits.max_pixels} pixels")
        return _to_rgb(ImageOps.exif_transpose(source))
    label, data = _encoded(source, limits, name)
    return _upright_rgb(_decode(data, label, limits))


def _encoded(source: ImageSource, limits: ImageLimits, name: str | None) -> tuple[str, bytes]:
    """The label errors name the input by, and its encoded bytes (read from disk for a path), size-checked."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image"
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise ImageTooLargeError(f"{label}: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    elif isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        data = _read_bytes(source, limits)
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    if not data:
        raise NotAnImageError(f"{label}: empty input")
    return label, data


def _decode(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    """Open and fully decode ``data``, refusing a disallowed format or too many pixels before decoding any."""
    return _load(_open(data, label, limits), label, data, limits)


def open_encoded(data: bytes, limits: ImageLimits | None = None, name: str | None = None) -> Image.Image:
    """The first half of :func:`load_image` for encoded bytes: the header read and checked (size in bytes, format,
    pixel count), no pixel decoded yet, so a caller can see ``.size`` and choose where to pay for the decoding.
    :func:`finish_decoding` does the rest; both raise the typed errors :func:`load_image` does."""
    limits = limits or ImageLimits()
    label, data = _encoded(data, limits, name)
    return _open(data, label, limits)


def finish_decoding(
    image: Image.Image, data: bytes, limits: ImageLimits | None = None, name: str | None = None
) -> Image.Image:
    """The second half: decode the pixels of an image :func:`open_encoded` opened from ``data`` and make it the
    upright 8-bit RGB image :func:`load_image` returns."""
    image = _load(image, name or "image", data, limits or ImageLimits())
    return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> Image.Image:
    # In place: the image is ours, and exif_transpose's default copies every upright image (0.14 ms for
    # 256x256 on a 2-vCPU VM, a third of the decode).
    ImageOps.exif_transpose(image, in_place=True)
    return _to_rgb(image)


def _open(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    with warnings.catch_warnings():
        # PIL warns about large images; our own pixel limit below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise NotAnImageError(f"{label}: not a recognised image format") from None
        except Image.DecompressionBombError as exc:
            raise _bomb_error(label, data, limits, exc) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise NotAnImageError(f"{label}: cannot be decoded ({exc})") from None
    if image.format not in limits.formats:
        raise UnsupportedImageFormatError(
            f"{label}: format {image.format} is not allowed (allowed: {', '.join(limits.formats)})"
        )
    w, h = image.size
    # Checked from the header, before any pixel is decoded: this is what stops a decompression bomb.
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(f"{label}: {w}x{h} pixels exceeds the limit of {limits.max_pixels} pixels")
    return image


def _load(image: Image.Image, label: str, data: bytes, limits: ImageLimits) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise _bomb_error(label, data, limits, exc) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise TruncatedImageError(f"{label}: image data is truncated or corrupt ({exc})") from None
    return image


def _bomb_error(label: str, data: bytes, limits: ImageLimits, exc: Exception) -> ImageTooLargeError:
    """PIL's refusal of an image past its own bomb limit (about 179 MP), in the words of ``limits``: a caller's
    pixel limit and message are the same for every size, PIL's limit only shows where it is the lower one."""
    size = _claimed_size(data)
    if size is None or size[0] * size[1] <= limits.max_pixels:
        return ImageTooLargeError(f"{label}: {exc}")
    return ImageTooLargeError(f"{label}: {size[0]}x{size[1]} pixels exceeds the limit of {limits.max_pixels} pixels")


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """The size the header of ``data`` claims, read as ``Image.open`` reads it but without its bomb check (only
    called once that check has refused the image, so no pixel is decoded)."""
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(data[:16]):
            continue
        try:
            return factory(io.BytesIO(data), None).size
        except (SyntaxError, IndexError, TypeError, ValueError, OSError, struct.error):
            continue
    return None


@functools.cache
def dataset_image_limits() -> ImageLimits:
    """Serving's decoder without serving's input limits, for a dataset's own files.

    The limits guard a server against hostile uploads; a dataset on disk is the user's, and every image that
    ``Image.open`` read before must still load: any format PIL opens, any size (PIL's own decompression-bomb
    check, which applied before, still does).
    """
    Image.init()  # registers every plugin, so Image.OPEN lists all the formats PIL can read
    return ImageLimits(max_bytes=sys.maxsize, max_pixels=sys.maxsize, formats=tuple(Image.OPEN))


def load_dataset_image(path: Path) -> Image.Image:
    """A dataset image decoded exactly as the server decodes an upload (EXIF orientation, alpha on white, ...).

    Training, the ReefScenes underwater re-rendering and serving share one decoder, so train and serve never
    see different pixels for a rotated or transparent image.
    """
    return load_image(path, dataset_image_limits())
