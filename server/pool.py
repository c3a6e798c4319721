"""The server's side of the captioning policy: loading the models, their manifests, and metrics.

The policy itself (primary, fallback, degenerate-caption replacement, circuit breaker, reasons) is the
library's :class:`~reefcap.models.policy.captioning.CaptionPolicy`, the same object ``reefcap caption`` and ``reefcap
eval`` use. :class:`ModelPool` is a thin adapter: it runs the policy's synchronous ``caption`` on a thread of
its own (a thread per batch in flight: one, or two for a cheap model on two cores or more, see
:func:`choose_workers`), keeps each model's manifest for ``/v1/models``
and ``/readyz``, and turns the policy's reports into Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from reefcap.models.engines.backends import BACKENDS, engine_class, load_engine
from reefcap.models.engines.base import CaptionEngine, DecodeOptions, EngineConfig, EngineInfo
from reefcap.models.engines.precision import auto_dtype
from reefcap.models.errors import ReefcapError
from reefcap.models.policy import CaptionPolicy, CircuitBreaker, PolicyObserver, Served, load_models
from reefcap.models.registry import resolve_model

from .cost import HEAVY_IMAGE_S, CostModel, choose_workers

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settings import ServerSettings

__all__ = [
    "CostModel",
    "ModelPool",
    "Served",
    "build_pool",
    "checkpoint_manifest",
    "choose_workers",
    "engine_config",
    "evaluation_manifest",
    "load_model",
]

log = logging.getLogger("reefcap.server")
MANIFEST = "manifest.json"


def fastest_backend() -> str:
    """ONNX Runtime when a backend named "onnx" is registered and its module imports, else PyTorch."""
    if "onnx" in BACKENDS:
        try:
            engine_class("onnx")
            return "onnx"
        except ReefcapError:
            pass
    return "torch"


def load_model(model: str, backend: str, config: EngineConfig) -> CaptionEngine:
    """Load ``model``; with backend "auto", the fastest backend first and PyTorch if that one cannot load it."""
    if backend != "auto":
        return load_engine(model, backend, config)
    first = fastest_backend()
    if first == "torch":
        return load_engine(model, "torch", config)
    try:
        return load_engine(model, first, config)
    except Exception as exc:  # e.g. no export possible for this checkpoint: PyTorch still serves it
        log.warning("%s: %s backend could not load it (%s); using torch", model, first, exc)
        if config.dtype == "int8":  # dtype auto's int8 is an ONNX export; PyTorch serves the checkpoint in fp32
            config = dataclasses.replace(config, dtype="fp32")
        return load_engine(model, "torch", config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_manifest(model: str) -> dict[str, Any]:
    """The ``manifest.json`` of the checkpoint ``model`` resolves to (whatever backend runs it), or {}."""
    try:
        return _read_json(resolve_model(model).path / MANIFEST)
    except ReefcapError:
        return {}


def evaluation_manifest(engine: CaptionEngine) -> dict[str, Any]:
    """The model's ``manifest.json`` (evaluation metrics per split), or {} when absent or unreadable.

    An ONNX export folder has a manifest of its own naming the checkpoint it came from; the evaluation
    lives with that checkpoint.
    """
    data = _read_json(Path(engine.describe().source) / MANIFEST)
    origin = data.get("source")
    if "metrics" not in data and isinstance(origin, dict) and isinstance(origin.get("path"), str):
        data = _read_json(Path(origin["path"]) / MANIFEST)
    return data


@dataclass
class Model:
    """A loaded engine in its role, with what ``describe`` says of it and its checkpoint's manifest."""

    engine: CaptionEngine
    role: str
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.info: EngineInfo = self.engine.describe()
        self.manifest = self.manifest or evaluation_manifest(self.engine)


class MetricsObserver(PolicyObserver):
    """The policy's reports as Prometheus metrics (none until the pool is given its :class:`Metrics`)."""

    def __init__(self) -> None:
        self.metrics: Metrics | None = None

    def fallback(self, reason: str, images: int) -> None:
        if self.metrics is not None:
            self.metrics.fallbacks.labels(reason=reason).inc(images)

    def inference(self, role: str, info: EngineInfo, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.inference_seconds.labels(info.name, role).observe(seconds)

    def breaker(self, is_open: bool) -> None:
        if self.metrics is not None:
            self.metrics.breaker_open.set(1 if is_open else 0)


class ModelPool:
    """Primary + fallback behind the library's :class:`CaptionPolicy`; ``caption_batch`` is the batcher's runner."""

    def __init__(
        self,
        primary: CaptionEngine | None,
        fallback: CaptionEngine | None,
        metrics: Metrics | None = None,
        primary_timeout_s: float = 20.0,
        breaker_failures: int = 5,
        breaker_reset_s: float = 30.0,
        primary_error: str | None = None,
        manifests: tuple[dict | None, dict | None] = (None, None),
        fallback_error: str | None = None,
        workers: int = 1,
    ) -> None:
        """``manifests``: the checkpoints' manifest.json for primary and fallback, when the caller resolved them
        (an engine's own folder may be an export cache); otherwise each engine's folder is read.
        ``primary_error`` / ``fallback_error``: why a model is not loaded, for ``/readyz``."""
        self.primary = Model(primary, "primary", manifests[0] or {}) if primary else None
        self.fallback = Model(fallback, "fallback", manifests[1] or {}) if fallback else None
        self.primary_error, self.fallback_error = primary_error, fallback_error
        self._observer = MetricsObserver()
        self.policy = CaptionPolicy(
            primary,
            fallback,
            primary_timeout_s=primary_timeout_s,
            breaker=CircuitBreaker(breaker_failures, breaker_reset_s),
            observer=self._observer,
            workers=workers,
        )
        self.cost = CostModel()
        # The policy blocks (it waits for the primary with a timeout): it runs here, off the event loop, on one
        # thread per batch the batcher may hand over at once.
        self.workers = workers
        self._dispatch = ThreadPoolExecutor(workers, thread_name_prefix="reefcap-policy")
        self._manifest_labels: list[tuple[str, ...]] = []
        self.metrics: Metrics | None = None
        if metrics is not None:
            self.attach_metrics(metrics)

    # ---- state --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.primary is not None or self.fallback is not None

    @property
    def circuit_open(self) -> bool:
        return self.policy.circuit_open

    def status(self) -> dict[str, Any]:
        serving = "primary" if self.primary else ("fallback" if self.fallback else "none")
        return {
            "ready": self.ready,
            "serving": serving,
            "primary": self.primary.info.to_dict() if self.primary else None,
            "primary_error": self.primary_error,
            "fallback": self.fallback.info.to_dict() if self.fallback else None,
            "fallback_error": self.fallback_error,
            "circuit_open": self.circuit_open,
        }

    def models(self) -> list[dict[str, Any]]:
        out = []
        for m in (self.primary, self.fallback):
            if m:
                out.append({"role": m.role, **m.info.to_dict(), "metrics": m.manifest.get("metrics", {})})
        return out

    def swap_primary(self, engine: CaptionEngine, manifest: dict[str, Any] | None = None) -> None:
        """Make ``engine`` the primary. Batches already running finish on the old one."""
        self.primary = Model(engine, "primary", manifest or {})
        self.primary_error = None
        self.policy.swap_primary(engine)
        self.publish_info()

    def set_workers(self, workers: int) -> None:
        """Run up to ``workers`` batches at once; before serving (the service's batcher reads ``workers``)."""
        self.workers = max(1, workers)
        old, self._dispatch = self._dispatch, ThreadPoolExecutor(self.workers, thread_name_prefix="reefcap-policy")
        old.shutdown(wait=False)
        self.policy.set_workers(self.workers)

    # ---- metrics ------------------------------------------------------------------------------

    def attach_metrics(self, metrics: Metrics) -> None:
        """Report to ``metrics`` from now on, starting with the loaded models and their manifest scores."""
        self.metrics = self._observer.metrics = metrics
        self.publish_info()

    def publish_info(self) -> None:
        """Set the model-info and manifest-quality gauges and the breaker gauge from the current state."""
        if self.metrics is None:
            return
        self.metrics.model_info.clear()
        # Only the manifest gauges are replaced; rolling feedback scores stay.
        for labels in self._manifest_labels:
            self.metrics.quality.remove(*labels)
        self._manifest_labels = []
        self.metrics.breaker_open.set(1 if self.circuit_open else 0)
        for m in (self.primary, self.fallback):
            if m:
                i = m.info
                self.metrics.model_info.labels(m.role, i.name, i.version, i.backend).set(1)
                for split, values in (m.manifest.get("metrics") or {}).items():
                    for metric, value in (values or {}).items() if isinstance(values, dict) else ():
                        if isinstance(value, (int, float)):
                            labels = (i.name, metric, "manifest", split)
                            self.metrics.quality.labels(*labels).set(value)
                            self._manifest_labels.append(labels)

    # ---- inference ----------------------------------------------------------------------------

    async def caption_batch(self, images: list[Image.Image], options: DecodeOptions) -> list[Served]:
        """One :class:`Served` per image, in order, from the primary where it can answer.

        The primary's timeout for this batch scales with its measured cost (:class:`CostModel`); a batch the
        primary answered alone updates that measure."""
        loop = asyncio.get_running_loop()
        timeout = self.cost.budget(self.policy.primary_timeout_s or 0.0, len(images), options)
        start = time.perf_counter()
        served = await loop.run_in_executor(self._dispatch, self.policy.caption, images, options, timeout)
        if all(s.fallback_reason is None for s in served):
            self.cost.observe(len(images), options, time.perf_counter() - start)
        return served

    def warm_up(self, options: DecodeOptions, images: int = 2) -> float | None:
        """Caption a synthetic batch on the primary twice (the first run pays one-time set-up) and seed the
        cost model from the second; returns its seconds, or None with no primary or on a failure (logged)."""
        if self.primary is None:
            return None
        rng = np.random.default_rng(0)
        batch = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(images)]
        try:
            self.primary.engine.caption(batch[:1], options)
            start = time.perf_counter()
            self.primary.engine.caption(batch, options)
        except Exception as exc:  # a primary that fails here will fail on requests too: the policy handles it
            log.warning("warm-up batch on the primary failed: %s", exc)
            return None
        seconds = time.perf_counter() - start
        self.cost.observe(images, options, seconds)
        log.info("warm-up: %d images in %.3f s on the primary (%s)", images, seconds, self.primary.info.name)
        return seconds

    def close(self) -> None:
        self.policy.close()
        self._dispatch.shutdown(wait=False)


def build_pool(settings: ServerSettings, metrics: Metrics | None = None, log_if_any: bool = False) -> ModelPool:
    """Load primary and fallback; a primary that fails to load leaves the fallback serving alone.

    With ``log_if_any`` load failures are logged only when some model loaded (the caller reports the rest).
    """
    own_ort_threads = set_inference_threads(settings.inference_threads)
    config = engine_config(settings)
    loaded = load_models(
        settings.model, settings.fallback, lambda m: load_model(m, settings.backend, engine_config(settings, m))
    )
    if loaded.primary_error and (loaded.fallback or not log_if_any):
        log.error("primary model %s not loaded: %s", settings.model, loaded.primary_error)
    if loaded.fallback_error and (loaded.primary or not log_if_any):
        log.error("fallback model %s not loaded: %s", settings.fallback, loaded.fallback_error)
    pool = ModelPool(
        loaded.primary,
        loaded.fallback,
        metrics,
        primary_timeout_s=settings.primary_timeout_s,
        breaker_failures=settings.breaker_failures,
        breaker_reset_s=settings.breaker_reset_s,
        primary_error=loaded.primary_error,
        fallback_error=loaded.fallback_error,
        manifests=(checkpoint_manifest(settings.model), checkpoint_manifest(settings.fallback or "")),
    )
    pool.cost.slack = settings.cost_slack
    defaults = DecodeOptions(num_beams=settings.num_beams, max_length=settings.max_length)
    if settings.warm_up:
        pool.warm_up(defaults)
        if tune_threads(pool, settings.inference_threads, defaults, set_ort=own_ort_threads):
            _reload_onnx_primary(pool, settings.model, config, defaults)
    pool.set_workers(choose_workers(pool.cost, settings.inference_workers, defaults))
    return pool


def tune_threads(pool: ModelPool, threads: int, options: DecodeOptions, set_ort: bool = True) -> bool:
    """With ``threads`` 0 (automatic): when the warm-up measured a heavy model, give inference every core
    instead of every core but one (the one kept for decoding and HTTP idles beside a model this slow).
    Sets PyTorch's threads and (with ``set_ort``) the ONNX backend's for its next load; True when the
    ONNX backend's changed."""
    import torch

    cores = os.cpu_count() or 1
    one = pool.cost.expected_s(1, options)
    if threads or cores < 2 or one is None or one < HEAVY_IMAGE_S or torch.get_num_threads() >= cores:
        return False
    log.info("the primary takes %.2f s an image: inference gets all %d cores", one, cores)
    torch.set_num_threads(cores)
    if set_ort:
        os.environ["REEFCAP_ORT_THREADS"] = str(cores)
    return set_ort


def _reload_onnx_primary(pool: ModelPool, model: str, config: EngineConfig, options: DecodeOptions) -> None:
    """ONNX Runtime fixes a session's threads when it loads: load an ONNX primary again and measure it; keep
    whichever of the two measured faster (on a CPU shared with other work more threads can be slower)."""
    if pool.primary is None or pool.primary.info.backend != "onnx":
        return
    old, before = pool.primary, pool.cost.unit_s
    try:
        engine = load_model(model, "onnx", config)
    except Exception as exc:  # keep serving with the threads it has
        log.warning("could not reload the primary with more threads: %s", exc)
        return
    pool.swap_primary(engine, old.manifest)
    pool.cost.unit_s = None
    if pool.warm_up(options) is not None and (before is None or (pool.cost.unit_s or before) < before):
        old.engine.close()
        return
    log.info("the primary was no faster on every core: back to the threads it had")
    os.environ["REEFCAP_ORT_THREADS"] = str(max(1, (os.cpu_count() or 1) - 1))  # for hot reloads too
    pool.swap_primary(old.engine, old.manifest)
    pool.cost.unit_s = before
    engine.close()


def engine_config(settings: ServerSettings, model: str | None = None) -> EngineConfig:
    """How the server loads every model: at start, and on a hot reload. dtype ``auto`` is int8 for a ``model``
    whose stored int8 agreement holds on this CPU and that the ONNX backend serves on the CPU, else fp32."""
    dtype = settings.dtype
    if dtype == "auto":
        dtype, why = "fp32", "no model named"
        onnx = settings.backend == "onnx" or (settings.backend == "auto" and fastest_backend() == "onnx")
        if model and onnx and settings.device in ("auto", "cpu") and not _has_cuda():
            dtype, why = auto_dtype(checkpoint_manifest(model))
        if model:
            log.info("%s: serving %s (%s)", model, dtype, why)
    return EngineConfig(device=settings.device, dtype=dtype, limits=settings.image_limits)


def _has_cuda() -> bool:
    """Whether ONNX Runtime would put an ``auto`` device on a GPU (int8 exports are for CPUs)."""
    from reefcap.models.engines.onnx_engine import ort_device

    return ort_device("auto")[0] == "cuda"


def set_inference_threads(threads: int) -> bool:
    """Intra-op threads of PyTorch and (unless REEFCAP_ORT_THREADS says otherwise) of the ONNX backend:
    ``threads``, or with 0 one per core minus one (at least one). True when it set the ONNX backend's."""
    import torch

    n = threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(n)
    if "REEFCAP_ORT_THREADS" in os.environ:  # the user's choice stands
        return False
    os.environ["REEFCAP_ORT_THREADS"] = str(n)  # read by the onnx backend when it loads
    return True
