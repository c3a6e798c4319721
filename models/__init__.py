"""The reefcap library: everything a captioning entrypoint needs, in rooms named for what they hold.

- :mod:`.engines`: the ``CaptionEngine`` interface, the backend registry, the PyTorch and ONNX Runtime
  backends (with their water-type experts variants), decoding, and the one loader (:func:`load_engine`);
- :mod:`.export`: ONNX export of a checkpoint (fp32, fp16, int8) and its cache;
- :mod:`.policy`: the captioning policy (primary, fallback, circuit breaker), the one result record
  (:class:`CaptionResult`), the quality gate, rolling feedback scores, the int8 agreement measure;
- :mod:`.data`: image decoding with limits, caption dataset records and readers;
- :mod:`.reefscenes`: the ReefScenes renderer, its dataset writer, probe set and realism report;
- at the top: checkpoint resolution (:mod:`.registry`), model factories (:mod:`.factory`), caption metrics
  (:mod:`.metrics`), underwater image quality (:mod:`.quality`), typed errors, the bundled sample photos and the
  ``reefcap model``/``export``/``agreement`` commands.

This package imports nothing from ``reefcap.training``, ``reefcap.server``, ``reefcap.clients`` or
``reefcap.bench``; they build on it. Heavy imports (torch, transformers, onnxruntime) happen only when an
engine is loaded.
"""

from reefcap.models.data.images import ImageLimits, load_image
from reefcap.models.engines.backends import BACKENDS, register_backend
from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineConfig, EngineInfo
from reefcap.models.engines.loader import load_engine
from reefcap.models.errors import (
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
from reefcap.models.policy.results import CaptionResult, ModelRef
from reefcap.models.registry import ResolvedModel, resolve_model, zoo_models

__all__ = [
    "BACKENDS",
    "Caption",
    "CaptionEngine",
    "CaptionResult",
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
    "ModelRef",
    "NotAnImageError",
    "ReefcapError",
    "ResolvedModel",
    "TruncatedImageError",
    "UnsupportedImageFormatError",
    "load_engine",
    "load_image",
    "register_backend",
    "resolve_model",
    "zoo_models",
]
