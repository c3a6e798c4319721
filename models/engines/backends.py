"""Short factory from a backend name to a loaded CaptionEngine.

Backends are imported lazily (by dotted path) so that choosing one never imports the others' heavy
dependencies, and so that a missing optional dependency names the backend that needed it.
"""

from __future__ import annotations

import importlib

from reefcap.models.engines.base import CaptionEngine, EngineConfig
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import check_model_name

BACKENDS: dict[str, str] = {
    "torch": "reefcap.models.engines.torch_engine:TorchCaptionEngine",
    "onnx": "reefcap.models.engines.onnx_engine:OnnxCaptionEngine",
}


def engine_class(backend: str) -> type[CaptionEngine]:
    """The CaptionEngine subclass registered under ``backend``."""
    try:
        target = BACKENDS[backend]
    except KeyError:
        raise ReefcapError(f"unknown backend {backend!r} (available: {', '.join(BACKENDS)})") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReefcapError(f"backend {backend!r} needs a dependency that is not installed: {exc.name}") from None
    return getattr(module, attr)


def load_engine(model: str, backend: str = "torch", config: EngineConfig | None = None) -> CaptionEngine:
    """Load ``model`` (zoo name, local directory or hub id) with the given backend."""
    check_model_name(model)  # before the backend's import: a typo should not wait for torch
    return engine_class(backend).load(model, config or EngineConfig())
