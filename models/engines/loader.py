"""The one loader: a model name, directory or hub id plus an :class:`EngineConfig` becomes a loaded engine.

Every entrypoint loads through :func:`load_engine` with the same defaults (``backend``, ``dtype`` and ``device``
``auto``, ``threads`` 0): the server at start and on every reload, ``reefcap caption`` (local and on Ray),
``reefcap eval``, ``reefcap agreement`` and the benchmarks. So an offline run answers with the engine the
service would, and a reloaded model gets what it would get at start-up. The rules, in one place:

- backend ``auto``: ONNX Runtime where it imports, else PyTorch; a model the ONNX backend cannot load (no
  export possible) is loaded by PyTorch instead, in fp32.
- dtype ``auto``: int8 where the checkpoint's stored int8 agreement holds on this kind of CPU and it runs on
  ONNX Runtime on the CPU (:func:`.precision.serving_dtype`), else fp32.
- threads 0: :func:`thread_count`.
- the checkpoint's kind picks the backend's variant (water-type experts, :mod:`.backends`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from reefcap.models.engines.backends import engine_class, importable
from reefcap.models.engines.base import CaptionEngine, EngineConfig
from reefcap.models.engines.manifests import checkpoint_folder, checkpoint_kind, parameter_count
from reefcap.models.engines.precision import serving_dtype
from reefcap.models.registry import check_model_name

log = logging.getLogger("reefcap.models")

# A model this large spends far longer in its matmuls than decoding and HTTP take per image (BLIP-base: 224 M
# parameters, about 0.9 s an image on 2 vCPUs), so the core otherwise kept free for them is better used by it.
HEAVY_PARAMETERS = 50_000_000


def thread_count(threads: int, parameters: int | None, cores: int | None = None) -> int:
    """Intra-op threads for a model: ``threads`` when set; else every core for a model of at least
    :data:`HEAVY_PARAMETERS`, and one per core minus one (at least one) for a smaller one. On a small shared CPU
    the inference threads of a light model fighting the image-decoding threads made batches up to 20x slower."""
    if threads:
        return threads
    cores = cores or os.cpu_count() or 1
    if parameters is not None and parameters >= HEAVY_PARAMETERS:
        return cores
    return max(1, cores - 1)


def pick_backend(backend: str) -> str:
    """``auto`` -> ``onnx`` where ONNX Runtime imports, else ``torch``; other names as given."""
    if backend != "auto":
        return backend
    return "onnx" if importable("onnx") else "torch"


def settle(model: str, config: EngineConfig, backend: str) -> EngineConfig:
    """``config`` with backend, dtype and threads made concrete for ``model`` on ``backend``."""
    dtype = config.dtype
    if dtype == "auto":
        dtype, why = serving_dtype(model, backend, config.device)
        log.info("%s: %s %s (%s)", model, backend, dtype, why)
    threads = thread_count(config.threads, parameter_count(model))
    return dataclasses.replace(config, backend=backend, dtype=dtype, threads=threads)


def load_engine(model: str, config: EngineConfig | None = None, **overrides: Any) -> CaptionEngine:
    """Load ``model`` (zoo name, local directory, hub id or ONNX export folder) as ``config`` describes, with
    ``overrides`` replacing its fields (``load_engine(m, backend="torch")``). See the module docstring."""
    config = dataclasses.replace(config or EngineConfig(), **overrides)
    check_model_name(model)  # before any backend's import: a typo should not wait for torch
    engine = _load(model, config)
    engine.checkpoint = checkpoint_folder(model)  # where the files saved beside its weights (a router) are
    return engine


def _load(model: str, config: EngineConfig) -> CaptionEngine:
    backend = pick_backend(config.backend)
    kind = checkpoint_kind(model)
    try:
        return engine_class(backend, kind).load(model, settle(model, config, backend))
    except Exception as exc:
        if config.backend != "auto" or backend == "torch":
            raise
        # e.g. no export possible for this checkpoint: PyTorch still serves it (int8 is an export: fp32 there). A
        # checkpoint PyTorch cannot load either raises PyTorch's error alone, with no word of the attempt.
        fallback = dataclasses.replace(config, dtype="fp32" if config.dtype in ("auto", "int8") else config.dtype)
        engine = engine_class("torch", kind).load(model, settle(model, fallback, "torch"))
        log.warning("%s: the %s backend could not load it (%s); PyTorch serves it", model, backend, exc)
        return engine
