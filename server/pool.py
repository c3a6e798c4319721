"""The server's side of the captioning policy: loading the models, their manifests, and metrics.

The policy itself (primary, fallback, degenerate-caption replacement, circuit breaker, reasons) is the
library's :class:`~reefcap.models.policy.captioning.CaptionPolicy`, the same object ``reefcap caption`` and
``reefcap eval`` use, and the models are loaded by the library's one loader
(:func:`~reefcap.models.engines.loader.load_engine`) with the settings' backend, dtype, device and threads, at
start and on every reload. :class:`ModelPool` is a thin adapter: the batcher awaits the policy's
``caption_async`` (one thread handoff per batch: the event loop to a model's thread and back; two batches in
flight for a cheap model on two cores or more, see :func:`choose_workers`), keeps each model's manifest for
``/v1/models`` and ``/readyz``, and turns the policy's reports into Prometheus metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from reefcap.models.engines.base import CaptionEngine, DecodeOptions, EngineConfig, EngineInfo
from reefcap.models.engines.manifests import checkpoint_manifest, evaluation_manifest
from reefcap.models.policy import CaptionPolicy, CaptionResult, CircuitBreaker, PolicyObserver, load_models

from .cost import CostModel, choose_workers

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settings import ServerSettings

__all__ = [
    "CostModel",
    "ModelPool",
    "build_pool",
    "checkpoint_manifest",
    "choose_workers",
    "engine_config",
    "evaluation_manifest",
]

log = logging.getLogger("reefcap.server")


def engine_config(settings: ServerSettings) -> EngineConfig:
    """How the server loads every model, at start and on every reload: the one loader settles ``auto`` per
    model (so a reloaded int8 primary is int8 again), and ``inference_threads`` 0 is its thread policy."""
    return EngineConfig(
        backend=settings.backend,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.inference_threads,
        limits=settings.image_limits,
    )


@dataclass
class Model:
    """A loaded engine in its role, with what ``describe`` says of it and its checkpoint's manifest."""

    engine: CaptionEngine
    role: str
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.info: EngineInfo = self.engine.describe()
        self.manifest = self.manifest or evaluation_manifest(self.info.source)


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
        self.workers = workers  # batches the batcher may hand over at once
        self._manifest_labels: list[tuple[str, ...]] = []
        self._info_labels: list[tuple[str, ...]] = []
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
        # Only the manifest gauges are replaced; rolling feedback scores stay.
        for labels in self._info_labels:
            self.metrics.retire(self.metrics.model_info, labels)
        for labels in self._manifest_labels:
            self.metrics.retire(self.metrics.quality, labels)
        self.metrics.breaker_open.set(1 if self.circuit_open else 0)
        self._info_labels = [(m.role, m.info.name, m.info.version, m.info.backend) for m in self._models()]
        for labels in self._info_labels:
            self.metrics.model_info.labels(*labels).set(1)
        scores = self.manifest_scores()
        for labels, value in scores:
            self.metrics.quality.labels(*labels).set(value)
        self._manifest_labels = [labels for labels, _ in scores]

    def manifest_scores(self) -> list[tuple[tuple[str, str, str, str], float]]:
        """((model, metric, "manifest", split), value) of every number in the loaded models' manifests."""
        out = []
        for m in self._models():
            for split, values in (m.manifest.get("metrics") or {}).items():
                for metric, value in (values or {}).items() if isinstance(values, dict) else ():
                    if isinstance(value, (int, float)):
                        out.append(((m.info.name, metric, "manifest", split), float(value)))
        return out

    def _models(self) -> list[Model]:
        return [m for m in (self.primary, self.fallback) if m]

    # ---- inference ----------------------------------------------------------------------------

    async def caption_batch(self, images: list[Image.Image], options: DecodeOptions) -> list[CaptionResult]:
        """One :class:`CaptionResult` per image, in order, from the primary where it can answer.

        The primary's timeout for this batch scales with its measured cost (:class:`CostModel`); a batch the
        primary answered alone updates that measure."""
        timeout = self.cost.budget(self.policy.primary_timeout_s or 0.0, len(images), options)
        start = time.perf_counter()
        served = await self.policy.caption_async(images, options, timeout)
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


def build_pool(settings: ServerSettings, metrics: Metrics | None = None, log_if_any: bool = False) -> ModelPool:
    """Load primary and fallback; a primary that fails to load leaves the fallback serving alone.

    With ``log_if_any`` load failures are logged only when some model loaded (the caller reports the rest).
    """
    loaded = load_models(settings.model, settings.fallback, engine_config(settings))
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
        manifests=(
            checkpoint_manifest(settings.model),
            checkpoint_manifest(settings.fallback) if settings.fallback else {},
        ),
    )
    pool.cost.slack = settings.cost_slack
    defaults = DecodeOptions(num_beams=settings.num_beams, max_length=settings.max_length)
    if settings.warm_up:
        pool.warm_up(defaults)
    pool.set_workers(choose_workers(pool.cost, settings.inference_workers, defaults))
    return pool
