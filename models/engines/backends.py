"""The backend registry: a backend name, and the kind of checkpoint it runs, to a CaptionEngine class.

Users name a backend (``torch`` or ``onnx``; ``auto`` is settled by the loader). A checkpoint of another kind
(water-type experts today) runs on that backend's variant for the kind, registered as its own entry
(``torch-experts``, ``onnx-experts``), so no engine swaps its class at load time. Entries are dotted paths,
imported on first use: choosing one never imports the others' heavy dependencies, and a missing optional
dependency names the backend that needed it.
"""

from __future__ import annotations

import importlib

from reefcap.models.engines.base import CaptionEngine
from reefcap.models.errors import ReefcapError

BACKENDS: dict[str, str] = {
    "torch": "reefcap.models.engines.torch_engine:TorchCaptionEngine",
    "onnx": "reefcap.models.engines.onnx_engine:OnnxCaptionEngine",
    "torch-experts": "reefcap.models.engines.experts_torch:TorchExpertsEngine",
    "onnx-experts": "reefcap.models.engines.experts_onnx:OnnxExpertsEngine",
}
# Checkpoint kinds besides plain BLIP; a kind's entry for a backend is "<backend>-<kind>".
KINDS = ("blip", "experts")


def register_backend(name: str, target: str) -> None:
    """Register (or replace) ``name`` as ``"module:Class"``; ``name`` is a backend, or ``backend-kind``."""
    if ":" not in target:
        raise ReefcapError(f"backend target must be 'module:Class', got {target!r}")
    BACKENDS[name] = target


def entry_name(backend: str, kind: str = "blip") -> str:
    """The registry entry that runs a checkpoint of ``kind`` on ``backend``."""
    return backend if kind == "blip" else f"{backend}-{kind}"


def engine_class(backend: str, kind: str = "blip") -> type[CaptionEngine]:
    """The CaptionEngine subclass registered for ``backend`` and checkpoint ``kind``."""
    name = entry_name(backend, kind)
    try:
        target = BACKENDS[name]
    except KeyError:
        users = ", ".join(n for n in BACKENDS if "-" not in n)
        if backend in BACKENDS:
            raise ReefcapError(f"backend {backend!r} cannot run {kind} checkpoints") from None
        raise ReefcapError(f"unknown backend {backend!r} (available: {users})") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReefcapError(f"backend {backend!r} needs a dependency that is not installed: {exc.name}") from None
    return getattr(module, attr)


def importable(backend: str) -> bool:
    """Whether ``backend``'s module imports here (ONNX Runtime may be absent)."""
    try:
        engine_class(backend)
    except ReefcapError:
        return False
    return True
