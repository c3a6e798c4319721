"""The captioning policy: a primary model, a fallback, and the rules between them.

One object, shared by every entrypoint that captions: the server (``reefcap serve`` awaits
:meth:`CaptionPolicy.caption_async`: each batch hops from the event loop to the primary's thread and back, one
handoff), ``reefcap caption`` (local and ``--ray``) and ``reefcap eval`` (the blocking :meth:`CaptionPolicy.caption`,
inline on the caller's thread). So an offline survey gets the same answers, and the same ``fallback`` reasons, as
the service. Answers are :class:`~reefcap.models.policy.results.CaptionResult` records.

The rules, for one batch of images:

- no primary loaded (missing or corrupt at start): the fallback answers (``primary_unavailable``);
- the circuit breaker is open: the fallback answers (``circuit_open``);
- every primary thread (one, or the server's ``workers``) still runs a batch, an overrun among them: the
  fallback answers rather than queue behind it (``primary_busy``);
- the primary raises (``primary_error``) or overruns ``primary_timeout_s`` (``primary_timeout``): the whole
  batch is retried on the fallback, and the failure counts towards the breaker; options the loaded models
  cannot decode with (a ``max_length`` past a model's text positions, say) are the request's fault: they
  raise :class:`~reefcap.models.errors.InvalidOptionsError` before any model runs and count for nothing;
- a degenerate primary caption (empty, or looping repetition: DAMF's decoding collapse, as
  :func:`reefcap.models.metrics.degenerate_reason` defines it): the fallback's caption for that image
  (``degenerate_empty`` / ``degenerate_repetition``).

``breaker_failures`` consecutive primary failures open the breaker: the primary is skipped for
``breaker_reset_s``, then tried again on one batch (half-open); if that batch fails too it opens again at
once. Every image the fallback answers is counted by reason in :attr:`CaptionPolicy.counts` and reported
to the :class:`PolicyObserver` (the server's feeds Prometheus).

Routing. Where the primary (the adapted model) has a router saved with it
(:mod:`reefcap.models.policy.routing`) and a fallback (the pretrained model) is loaded, each batch is split by
route first: images the router calls in air are answered by the fallback, as the model that fits them (not a
fallback answer: ``fallback.used`` stays false; should it fail, the primary answers them), and the underwater
part goes through the rules above, as a batch of its own. Each part runs batched on its model and the answers
come back in the batch's order, every one naming its route (``CaptionResult.route``). Without a router nothing is
split and ``route`` is None; a router without a fallback still reports each image's domain.

This module imports neither torch nor any backend: engines are passed in already loaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from PIL import Image

from reefcap.models.data.images import ImageSource
from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions
from reefcap.models.errors import InvalidOptionsError, ModelLoadError
from reefcap.models.metrics import degenerate_reason
from reefcap.models.policy.lanes import (
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_BREAKER_RESET_S,
    CircuitBreaker,
    Lane,
    PolicyObserver,
)
from reefcap.models.policy.results import CaptionResult
from reefcap.models.policy.routing import RoutedBatch, RouteDecision, Router, find_router

__all__ = [
    "DEFAULT_BREAKER_FAILURES",
    "DEFAULT_BREAKER_RESET_S",
    "CaptionPolicy",
    "CircuitBreaker",
    "PolicyObserver",
    "as_policy",
]

log = logging.getLogger("reefcap.policy")
FIND_ROUTER = "find"  # the default ``router``: the one saved with the primary's checkpoint, if any


class CaptionPolicy:
    """Primary + fallback engines behind one ``caption`` call (see the module docstring).

    ``primary_timeout_s`` None runs the primary inline on the caller's thread, with no timeout (offline use);
    a number runs it on a thread of its own (``workers`` threads: that many batches may run at once, each
    routed, timed and counted by the breaker on its own). :meth:`caption_async` always runs batches on the
    lanes' threads. ``observer`` is told of fallbacks, batch times and the breaker. ``router``: by default the
    one saved with the primary's checkpoint (found again on every swap), or a :class:`Router` to use whatever
    the primary, or None to route nothing.
    """

    def __init__(
        self,
        primary: CaptionEngine | None,
        fallback: CaptionEngine | None = None,
        *,
        primary_timeout_s: float | None = None,
        breaker: CircuitBreaker | None = None,
        observer: PolicyObserver | None = None,
        workers: int = 1,
        router: Router | str | None = FIND_ROUTER,
    ) -> None:
        self.primary_timeout_s, self.workers = primary_timeout_s, max(1, workers)
        self._router_choice = router
        self._primary = Lane(primary, "primary", self.workers) if primary else None
        self._router = self._router_for(self._primary)
        self._fallback = Lane(fallback, "fallback", self.workers) if fallback else None
        self.breaker = breaker or CircuitBreaker()
        self.observer = observer or PolicyObserver()
        self.counts: Counter[str] = Counter()  # images answered by the fallback, by reason
        self.route_counts: Counter[str] = Counter()  # routed images by domain
        self._lock = threading.Lock()

    @property
    def primary(self) -> CaptionEngine | None:
        return self._primary.engine if self._primary else None

    @property
    def fallback(self) -> CaptionEngine | None:
        return self._fallback.engine if self._fallback else None

    @property
    def circuit_open(self) -> bool:
        return self.breaker.is_open

    @property
    def router(self) -> Router | None:
        """The router in use (None: nothing is routed)."""
        return self._router

    def _router_for(self, lane: Lane | None) -> Router | None:
        if self._router_choice != FIND_ROUTER:
            return self._router_choice if isinstance(self._router_choice, Router) else None
        return find_router(lane.engine) if lane is not None else None

    def swap_primary(self, engine: CaptionEngine) -> None:
        """Make ``engine`` the primary and close the breaker. A batch already running finishes on the old one."""
        new = Lane(engine, "primary", self.workers)
        router = self._router_for(new)  # a new model brings its own router (or none)
        with self._lock:
            old, self._primary, self._router = self._primary, new, router
            self.breaker.record_success()
        if old is not None:
            old.close()

    def set_workers(self, workers: int) -> None:
        """Let ``workers`` batches run at once on each model (the server sets it at start, from the warm-up)."""
        self.workers = max(1, workers)
        with self._lock:
            old = (self._primary, self._fallback)
            self._primary, self._fallback = (Lane(x.engine, x.role, self.workers) if x else None for x in old)
        for lane in old:
            if lane is not None:
                lane.close()

    def decode(self, source: ImageSource, name: str | None = None) -> Any:
        """Decode an image within the limits of the engine that would answer first."""
        lane = self._primary or self._fallback
        if lane is None:
            raise ModelLoadError("no model is loaded")
        return lane.engine.decode(source, name)

    def check_options(self, options: DecodeOptions) -> DecodeOptions:
        """``options`` if every loaded model can decode with them (either may answer a batch), else
        :class:`InvalidOptionsError` naming the limit: the request's fault, never counted against a model."""
        with self._lock:
            lanes = [lane for lane in (self._primary, self._fallback) if lane is not None]
        for lane in lanes:
            lane.engine.check_options(options)
        return options.validate()

    # ---- the two drivers: the same rules, blocking or awaited -----------------------------------------------

    def caption(
        self, images: Sequence[Any], options: DecodeOptions | None = None, timeout_s: float | None = None
    ) -> list[CaptionResult]:
        """One :class:`CaptionResult` per image, in order, from the primary where it can answer (blocking).

        ``timeout_s`` replaces ``primary_timeout_s`` for this batch (the server scales it with the batch's
        cost). Options no loaded model can decode with raise :class:`InvalidOptionsError` before any model
        runs, and count towards neither the breaker nor the fallbacks."""
        images, options, primary, fallback, router = self._begin(images, options)
        timeout = self._timeout(timeout_s)
        if router is None:
            return self._answer(images, options, timeout, primary, fallback)
        images, decisions = self._decide(router, images)
        batch = RoutedBatch.split(decisions, in_air_model=fallback is not None)
        wet, dry = [], []
        if batch.underwater:
            wet = self._answer(batch.underwater_part(images), options, timeout, primary, fallback)
        if batch.in_air:
            dry = self._answer_in_air(batch.in_air_part(images), options, primary, fallback)
        return self._count_routes(batch.merged(wet, dry))

    async def caption_async(
        self, images: Sequence[Any], options: DecodeOptions | None = None, timeout_s: float | None = None
    ) -> list[CaptionResult]:
        """:meth:`caption` for an event loop: every batch runs on its lane's threads and is awaited there (the
        router too, off the loop: it touches every image)."""
        images, options, primary, fallback, router = self._begin(images, options)
        timeout = self._timeout(timeout_s)
        if router is None:
            return await self._answer_async(images, options, timeout, primary, fallback)
        loop = asyncio.get_running_loop()
        images, decisions = await loop.run_in_executor(None, self._decide, router, images)
        batch = RoutedBatch.split(decisions, in_air_model=fallback is not None)
        wet, dry = [], []
        if batch.underwater:
            wet = await self._answer_async(batch.underwater_part(images), options, timeout, primary, fallback)
        if batch.in_air:
            dry = await self._answer_in_air_async(batch.in_air_part(images), options, primary, fallback)
        return self._count_routes(batch.merged(wet, dry))

    def _answer(self, images: list, options: DecodeOptions, timeout, primary, fallback) -> list[CaptionResult]:
        """The primary's rules for one batch (or the underwater part of one)."""
        reason, error = self._route(primary, threaded=timeout is not None)
        if reason is None:
            try:
                captions = self._timed(primary, images, options, timeout, reserved=timeout is not None)
            except InvalidOptionsError:
                raise  # the request's own options: not a model fault
            except Exception as exc:  # any engine failure sends the batch to the fallback
                reason, error = self._failed(exc, len(images))
            else:
                self._succeeded()
                bad = self._degenerate(captions, fallback)
                redo = self._replacements(fallback, images, options, bad) if bad else []
                return self._served(primary, fallback, captions, bad, redo)
        captions = self._timed(self._need(fallback, reason, error), images, options, None)
        return self._answered_by_fallback(fallback, captions, reason)

    async def _answer_async(self, images: list, options: DecodeOptions, timeout, primary, fallback) -> list:
        reason, error = self._route(primary, threaded=True)
        if reason is None:
            try:
                captions = await self._timed_async(primary, images, options, timeout, reserved=True)
            except InvalidOptionsError:
                raise
            except Exception as exc:
                reason, error = self._failed(exc, len(images))
            else:
                self._succeeded()
                bad = self._degenerate(captions, fallback)
                redo = await self._replacements_async(fallback, images, options, bad) if bad else []
                return self._served(primary, fallback, captions, bad, redo)
        captions = await self._timed_async(self._need(fallback, reason, error), images, options, None)
        return self._answered_by_fallback(fallback, captions, reason)

    def _answer_in_air(self, images: list, options: DecodeOptions, primary, fallback) -> list[CaptionResult]:
        """The in-air part, on the fallback as the model that fits it; the primary answers it if that fails."""
        try:
            captions = self._timed(fallback, images, options, None)
        except InvalidOptionsError:
            raise
        except Exception as exc:
            lane = self._in_air_stand_in(primary, exc, len(images))
            return [CaptionResult.of(c, lane.info) for c in self._timed(lane, images, options, None)]
        return [CaptionResult.of(c, fallback.info) for c in captions]

    async def _answer_in_air_async(self, images: list, options: DecodeOptions, primary, fallback) -> list:
        try:
            captions = await self._timed_async(fallback, images, options, None)
        except InvalidOptionsError:
            raise
        except Exception as exc:
            lane = self._in_air_stand_in(primary, exc, len(images))
            return [CaptionResult.of(c, lane.info) for c in await self._timed_async(lane, images, options, None)]
        return [CaptionResult.of(c, fallback.info) for c in captions]

    def _in_air_stand_in(self, primary: Lane | None, exc: Exception, images: int) -> Lane:
        if primary is None or self.breaker.is_open:
            raise exc
        log.warning("the in-air model failed on %d in-air images (%s): the primary answers them", images, exc)
        return primary

    # ---- routing ----------------------------------------------------------------------------------------------

    def _decide(self, router: Router, images: list) -> tuple[list, list[RouteDecision]]:
        """Decode what is not yet an RGB image (the router needs pixels), then route every image."""
        decoded = [im if isinstance(im, Image.Image) and im.mode == "RGB" else self.decode(im) for im in images]
        return decoded, router.route(decoded)

    def _count_routes(self, served: list[CaptionResult]) -> list[CaptionResult]:
        for result in served:
            self.route_counts[result.route.domain] += 1
        return served

    # ---- the rules ------------------------------------------------------------------------------------------

    def _begin(self, images: Sequence[Any], options: DecodeOptions | None) -> tuple:
        images, options = list(images), self.check_options(options or DecodeOptions())
        with self._lock:  # one consistent set even if a reload swaps
            return images, options, self._primary, self._fallback, self._router

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.primary_timeout_s if timeout_s is None or self.primary_timeout_s is None else timeout_s

    def _route(self, primary: Lane | None, threaded: bool) -> tuple[str | None, Exception | None]:
        """Why the primary is not even tried (None: try it)."""
        if primary is None:
            return "primary_unavailable", None
        if self.breaker.is_open:
            return "circuit_open", None
        if threaded and not primary.reserve():
            return "primary_busy", None  # every thread still runs a batch (an overrun): do not queue behind it
        return None, None

    def _failed(self, exc: Exception, images: int) -> tuple[str, Exception]:
        reason = "primary_timeout" if isinstance(exc, TimeoutError) else "primary_error"
        if reason == "primary_error":
            log.warning("primary failed on a batch of %d: %s", images, exc)
        self.breaker.record_failure()
        self.observer.breaker(self.breaker.is_open)
        return reason, exc

    def _succeeded(self) -> None:
        self.breaker.record_success()
        self.observer.breaker(self.breaker.is_open)

    @staticmethod
    def _need(fallback: Lane | None, reason: str, error: Exception | None) -> Lane:
        if fallback is None:
            detail = f"{reason}: {error}" if error else reason
            raise ModelLoadError(f"primary cannot answer ({detail}) and no fallback model is loaded") from error
        return fallback

    @staticmethod
    def _degenerate(captions: list[Caption], fallback: Lane | None) -> list[tuple[int, str]]:
        """Images whose primary caption collapsed, with why (none to replace without a fallback)."""
        if fallback is None:
            return []
        return [(i, f"degenerate_{r}") for i, c in enumerate(captions) if (r := degenerate_reason(c.caption))]

    def _replacements(self, fallback: Lane, images: list, options: DecodeOptions, bad: list) -> list[Caption]:
        try:
            return self._timed(fallback, [images[i] for i, _ in bad], options, None)
        except Exception as exc:  # keep the primary's caption rather than fail the batch
            log.warning("fallback failed replacing degenerate captions: %s", exc)
            return []

    async def _replacements_async(self, fallback: Lane, images: list, options: DecodeOptions, bad: list) -> list:
        try:
            return await self._timed_async(fallback, [images[i] for i, _ in bad], options, None)
        except Exception as exc:
            log.warning("fallback failed replacing degenerate captions: %s", exc)
            return []

    def _served(self, primary: Lane, fallback: Lane | None, captions: list, bad: list, redo: list) -> list:
        served = [CaptionResult.of(c, primary.info) for c in captions]
        for (i, reason), c in zip(bad, redo, strict=False):  # redo is empty when the fallback failed
            served[i] = CaptionResult.of(c, fallback.info, reason)
            self._count(reason, 1)
        return served

    def _answered_by_fallback(self, fallback: Lane, captions: list[Caption], reason: str) -> list[CaptionResult]:
        self._count(reason, len(captions))
        return [CaptionResult.of(c, fallback.info, reason) for c in captions]

    def _timed(self, lane: Lane, images: list, options: DecodeOptions, timeout_s, reserved: bool = False) -> list:
        start = time.perf_counter()
        captions = lane.run(images, options, timeout_s, reserved)
        self.observer.inference(lane.role, lane.info, time.perf_counter() - start)
        return captions

    async def _timed_async(self, lane: Lane, images: list, options: DecodeOptions, timeout_s, reserved=False):
        start = time.perf_counter()
        captions = await lane.run_async(images, options, timeout_s, reserved)
        self.observer.inference(lane.role, lane.info, time.perf_counter() - start)
        return captions

    def _count(self, reason: str | None, images: int) -> None:
        if reason:
            self.counts[reason] += images
            self.observer.fallback(reason, images)

    def close(self) -> None:
        for lane in (self._primary, self._fallback):
            if lane is not None:
                lane.close()


def as_policy(engine: CaptionEngine | CaptionPolicy) -> CaptionPolicy:
    """``engine`` itself if it is a policy; a bare engine becomes a policy with no fallback."""
    return engine if isinstance(engine, CaptionPolicy) else CaptionPolicy(engine)
