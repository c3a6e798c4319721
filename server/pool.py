"""The primary model, its fallback and the policy between them.

- primary missing or corrupt at start: the fallback serves alone (``/readyz`` says so);
- primary raises or overruns ``primary_timeout_s``: the whole batch is retried on the fallback;
- a degenerate primary caption (empty, or looping repetition: DAMF's decoding collapse, as
  :func:`reefcap.models.metrics.degenerate_reason` defines it): the fallback's caption for that image;
- ``breaker_failures`` consecutive primary failures open a circuit breaker: the primary is skipped for
  ``breaker_reset_s``, then tried again on one batch.

Every fallback is counted by reason. Each engine runs on its own single thread, so an overrunning primary
can finish in the background while the fallback answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from reefcap.models.backends import BACKENDS, engine_class, load_engine
from reefcap.models.engine import Caption, CaptionEngine, DecodeOptions, EngineConfig, EngineInfo
from reefcap.models.errors import ModelLoadError, ReefcapError
from reefcap.models.metrics import degenerate_reason
from reefcap.models.registry import resolve_model

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


@dataclass(frozen=True)
class Served:
    """One image's answer: the caption, who gave it and, if the fallback did, why."""

    caption: Caption
    info: EngineInfo
    fallback_reason: str | None = None


class _Slot:
    """A loaded engine with its own inference thread."""

    def __init__(self, engine: CaptionEngine, role: str, manifest: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.role = role
        self.info = engine.describe()
        self.manifest = manifest if manifest else evaluation_manifest(engine)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reefcap-{role}")
        self.busy = 0  # batches submitted and not finished (an overrun keeps this above zero)
        self.busy_lock = threading.Lock()  # busy changes on the event loop and on the engine's thread

    def close(self) -> None:
        self.executor.shutdown(wait=False)


class ModelPool:
    """Primary + fallback engines and the fallback policy; ``caption_batch`` is the batcher's runner."""

    def __init__(
        self,
        primary: CaptionEngine | None,
        fallback: CaptionEngine | None,
        metrics: Any = None,
        primary_timeout_s: float = 20.0,
        breaker_failures: int = 5,
        breaker_reset_s: float = 30.0,
        primary_error: str | None = None,
        manifests: tuple[dict | None, dict | None] = (None, None),
    ) -> None:
        """``manifests``: the checkpoints' manifest.json for primary and fallback, when the caller resolved them
        (an engine's own folder may be an export cache); otherwise each engine's folder is read."""
        self.metrics = metrics
        self.primary = _Slot(primary, "primary", manifests[0]) if primary else None
        self.fallback = _Slot(fallback, "fallback", manifests[1]) if fallback else None
        self.primary_error = primary_error  # why the primary is not loaded, for /readyz
        self.fallback_error: str | None = None
        self.primary_timeout_s = primary_timeout_s
        self.breaker_failures = breaker_failures
        self.breaker_reset_s = breaker_reset_s
        self._failures = 0
        self._open_until = 0.0
        self._lock = threading.Lock()
        self._publish_info()

    # ---- state --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.primary is not None or self.fallback is not None

    @property
    def circuit_open(self) -> bool:
        return time.monotonic() < self._open_until

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
        for slot in (self.primary, self.fallback):
            if slot:
                out.append({"role": slot.role, **slot.info.to_dict(), "metrics": slot.manifest.get("metrics", {})})
        return out

    def swap_primary(self, engine: CaptionEngine, manifest: dict[str, Any] | None = None) -> None:
        """Make ``engine`` the primary. Batches already running finish on the old one."""
        new = _Slot(engine, "primary", manifest)
        with self._lock:
            old, self.primary = self.primary, new
            self.primary_error = None
            self._failures, self._open_until = 0, 0.0
        if old is not None:
            old.close()  # its thread ends after any batch it is running
        self._publish_info()

    def _publish_info(self) -> None:
        if self.metrics is None:
            return
        self.metrics.model_info.clear()
        # Only the manifest gauges are replaced; rolling feedback scores stay.
        for labels in getattr(self, "_manifest_labels", []):
            self.metrics.quality.remove(*labels)
        self._manifest_labels = []
        self.metrics.breaker_open.set(1 if self.circuit_open else 0)
        for slot in (self.primary, self.fallback):
            if slot:
                i = slot.info
                self.metrics.model_info.labels(slot.role, i.name, i.version, i.backend).set(1)
                for split, values in (slot.manifest.get("metrics") or {}).items():
                    for metric, value in (values or {}).items() if isinstance(values, dict) else ():
                        if isinstance(value, (int, float)):
                            labels = (i.name, metric, "manifest", split)
                            self.metrics.quality.labels(*labels).set(value)
                            self._manifest_labels.append(labels)

    # ---- inference ----------------------------------------------------------------------------

    async def _run(self, slot: _Slot, images: list[Image.Image], options: DecodeOptions) -> list[Caption]:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()

        def work() -> list[Caption]:
            try:
                return slot.engine.caption(images, options)
            finally:
                with slot.busy_lock:
                    slot.busy -= 1

        with slot.busy_lock:
            slot.busy += 1
        fut = loop.run_in_executor(slot.executor, work)
        if slot.role == "primary":
            # shield: on a timeout the primary keeps running in its thread; we stop waiting for it.
            captions = await asyncio.wait_for(asyncio.shield(fut), self.primary_timeout_s)
        else:
            captions = await fut
        if self.metrics is not None:
            self.metrics.inference_seconds.labels(slot.info.name, slot.role).observe(time.perf_counter() - start)
        return captions

    def _primary_failed(self) -> None:
        with self._lock:
            self._failures += 1
            # Half-open: the first batch after the breaker's pause failed too, so it opens again at once.
            half_open = self._open_until > 0
            if self._failures >= self.breaker_failures or half_open:
                self._open_until = time.monotonic() + self.breaker_reset_s
                self._failures = 0
                log.warning("primary failed %d times in a row: circuit open", self.breaker_failures)
        if self.metrics is not None:
            self.metrics.breaker_open.set(1 if self.circuit_open else 0)

    def _primary_ok(self) -> None:
        with self._lock:
            self._failures = 0
            self._open_until = 0.0  # closed again
        if self.metrics is not None:
            self.metrics.breaker_open.set(0)

    async def caption_batch(self, images: list[Image.Image], options: DecodeOptions) -> list[Served]:
        """One :class:`Served` per image, in order, from the primary where it can answer."""
        primary, fallback = self.primary, self.fallback  # one consistent pair even if a reload swaps
        reason: str | None = None
        if primary is None:
            reason = "primary_unavailable"
        elif self.circuit_open:
            reason = "circuit_open"
        elif primary.busy:
            reason = "primary_busy"  # still running an overrun batch: do not queue behind it
        else:
            try:
                captions = await self._run(primary, images, options)
            except TimeoutError:
                reason = "primary_timeout"
            except Exception as exc:  # any engine failure sends the batch to the fallback
                log.warning("primary failed on a batch of %d: %s", len(images), exc)
                reason = "primary_error"
            if reason is not None:
                self._primary_failed()
            else:
                self._primary_ok()
                return await self._replace_degenerate(primary, fallback, images, options, captions)
        if fallback is None:
            raise ModelLoadError(f"primary cannot answer ({reason}) and no fallback model is loaded")
        captions = await self._run(fallback, images, options)
        self._count(reason, len(images))
        return [Served(c, fallback.info, reason) for c in captions]

    async def _replace_degenerate(
        self, primary: _Slot, fallback: _Slot | None, images: list[Image.Image], options: DecodeOptions, captions
    ) -> list[Served]:
        served = [Served(c, primary.info) for c in captions]
        bad = [(i, r) for i, c in enumerate(captions) if (r := degenerate_reason(c.caption))]
        if not bad or fallback is None:
            return served
        try:
            redo = await self._run(fallback, [images[i] for i, _ in bad], options)
        except Exception as exc:  # keep the primary's caption rather than fail the request
            log.warning("fallback failed replacing degenerate captions: %s", exc)
            return served
        for (i, r), c in zip(bad, redo, strict=True):
            served[i] = Served(c, fallback.info, f"degenerate_{r}")
            self._count(f"degenerate_{r}", 1)
        return served

    def _count(self, reason: str | None, n: int) -> None:
        if self.metrics is not None and reason:
            self.metrics.fallbacks.labels(reason=reason).inc(n)

    def close(self) -> None:
        for slot in (self.primary, self.fallback):
            if slot:
                slot.close()
