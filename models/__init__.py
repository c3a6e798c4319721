"""Model side of reefcap: checkpoint resolution, the CaptionEngine interface and its backends.

This package imports nothing from ``reefcap.training``, ``reefcap.server`` or ``reefcap.clients``; the
other packages build on it. Heavy imports (torch, transformers) happen only when an engine is loaded.
"""

from reefcap.models.data.images import ImageLimits, load_image
from reefcap.models.engines.backends import BACKENDS, load_engine
from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineConfig, EngineInfo

from .errors import (
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidOptionsError,
    ModelLoadError,
    ModelNotFoundError,
    NotAnImageError,
    ReefcapError,
    TruncatedImageError,
    UnsupportedImageFormatError,
)
from .registry import ResolvedModel, resolve_model, zoo_models

__all__ = [
    "BACKENDS",
    "Caption",
    "CaptionEngine",
    "DecodeOptions",
    "EngineConfig",
    "EngineInfo",
    "ImageError",
    "ImageLimits",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "InvalidOptionsError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NotAnImageError",
    "ReefcapError",
    "ResolvedModel",
    "TruncatedImageError",
    "UnsupportedImageFormatError",
    "load_engine",
    "load_image",
    "resolve_model",
    "zoo_models",
]
