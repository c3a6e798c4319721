"""The captioning policy: a primary model, a fallback, and the rules between them.

One object, shared by every entrypoint that captions: the server (``reefcap serve``, through an async
adapter in ``server/pool.py``), ``reefcap caption`` (local and ``--ray``) and ``reefcap eval``. So an
offline survey gets the same answers, and the same ``fallback`` reasons, as the service.

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

This module imports neither torch nor any backend: engines are passed in already loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from reefcap.models.data.images import ImageSource
from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineInfo
from reefcap.models.errors import InvalidOptionsError, ModelLoadError, ReefcapError
from reefcap.models.metrics import degenerate_reason

log = logging.getLogger("reefcap.policy")

# The server's defaults too (server/settings.py reads these), so offline and served answers agree.
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_RESET_S = 30.0


@dataclass(frozen=True)
class Served:
    """One image's answer: the caption, which engine gave it and, if the fallback did, why."""

    caption: Caption
    info: EngineInfo
    fallback_reason: str | None = None

    @property
    def fallback(self) -> dict[str, Any]:
        """``{"used", "reason"}``: the ``fallback`` field of a server result and of an offline result line."""
        return {"used": self.fallback_reason is not None, "reason": self.fallback_reason}


class PolicyObserver:
    """Told what the policy does; every hook does nothing here. The server's subclass feeds Prometheus."""

    def fallback(self, reason: str, images: int) -> None:
        """``images`` were answered by the fallback because of ``reason``."""

    def inference(self, role: str, info: EngineInfo, seconds: float) -> None:
        """The engine in ``role`` ("primary" or "fallback") captioned one batch in ``seconds``."""

    def breaker(self, is_open: bool) -> None:
        """The circuit breaker's state after a primary batch succeeded or failed."""


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures, for ``reset_s``; then one trial (half-open)."""

    def __init__(
        self,
        failures: int = DEFAULT_BREAKER_FAILURES,
        reset_s: float = DEFAULT_BREAKER_RESET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or not reset_s > 0:
            raise ReefcapError(f"circuit breaker needs failures >= 1 and reset_s > 0, got {failures}, {reset_s}")
        self.failures, self.reset_s, self._clock = failures, reset_s, clock
        self._count = 0
        self._open_until = 0.0  # > 0 once opened, until a success closes it: marks the half-open trial
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._clock() < self._open_until

    def record_failure(self) -> None:
        with self._lock:
            self._count += 1
            # Half-open: the first batch after the pause failed too, so it opens again at once.
            if self._count >= self.failures or self._open_until > 0:
                self._open_until = self._clock() + self.reset_s
                self._count = 0
                log.warning("primary failed %d times in a row: circuit open", self.failures)

    def record_success(self) -> None:
        with self._lock:
            self._count, self._open_until = 0, 0.0


class _Lane:
    """An engine, and (when the primary has a timeout) the threads it runs on, so an overrunning batch can
    finish in the background while the fallback answers. ``workers`` batches may run at once (the server
    runs two on a small model, each on its own core; engines serve concurrent ``caption`` calls)."""

    def __init__(self, engine: CaptionEngine, role: str, threaded: bool, workers: int = 1) -> None:
        self.engine, self.role, self.info = engine, role, engine.describe()
        self.workers = max(1, workers)
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix=f"reefcap-{role}") if threaded else None
        self.busy = 0  # batches reserved and not finished (an overrun keeps this above zero)
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Claim a thread for one batch; False when every thread still runs one (so it would queue behind
        an overrun). Checked and claimed under one lock: two batches cannot both take the last thread."""
        if self.executor is None:
            return True
        with self._lock:
            if self.busy >= self.workers:
                return False
            self.busy += 1
            return True

    def run(self, images: list[Any], options: DecodeOptions, timeout_s: float | None) -> list[Caption]:
        """Caption on one of this lane's threads (claimed by :meth:`reserve`, waiting at most ``timeout_s``),
        or inline when it has none."""
        if self.executor is None:
            return self.engine.caption(images, options)

        def work() -> list[Caption]:
            try:
                return self.engine.caption(images, options)
            finally:
                with self._lock:
                    self.busy -= 1

        # On a timeout the batch keeps running on the lane's thread; we only stop waiting for it.
        return self.executor.submit(work).result(timeout_s)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False)  # the threads end after any batch they are running


class CaptionPolicy:
    """Primary + fallback engines behind one synchronous ``caption`` call (see the module docstring).

    ``primary_timeout_s`` None runs the primary inline on the caller's thread, with no timeout (offline use);
    a number runs it on a thread of its own (``workers`` threads: that many batches may run at once, each
    routed, timed and counted by the breaker on its own). ``observer`` is told of fallbacks, batch times
    and the breaker.
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
    ) -> None:
        self.primary_timeout_s, self.workers = primary_timeout_s, workers
        self._primary = _Lane(primary, "primary", primary_timeout_s is not None, workers) if primary else None
        self._fallback = _Lane(fallback, "fallback", False) if fallback else None
        self.breaker = breaker or CircuitBreaker()
        self.observer = observer or PolicyObserver()
        self.counts: Counter[str] = Counter()  # images answered by the fallback, by reason
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

    def swap_primary(self, engine: CaptionEngine) -> None:
        """Make ``engine`` the primary and close the breaker. A batch already running finishes on the old one."""
        new = _Lane(engine, "primary", self.primary_timeout_s is not None, self.workers)
        with self._lock:
            old, self._primary = self._primary, new
            self.breaker.record_success()
        if old is not None:
            old.close()

    def set_workers(self, workers: int) -> None:
        """Let ``workers`` primary batches run at once (the server sets it at start, from the warm-up)."""
        self.workers = max(1, workers)
        with self._lock:
            old = self._primary
            if old is not None:
                self._primary = _Lane(old.engine, "primary", self.primary_timeout_s is not None, self.workers)
        if old is not None:
            old.close()

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

    def caption(
        self, images: Sequence[Any], options: DecodeOptions | None = None, timeout_s: float | None = None
    ) -> list[Served]:
        """One :class:`Served` per image, in order, from the primary where it can answer.

        ``timeout_s`` replaces ``primary_timeout_s`` for this batch (the server scales it with the batch's
        cost). Options no loaded model can decode with raise :class:`InvalidOptionsError` before any model
        runs, and count towards neither the breaker nor the fallbacks."""
        images, options = list(images), self.check_options(options or DecodeOptions())
        with self._lock:
            primary, fallback = self._primary, self._fallback  # one consistent pair even if a reload swaps
        reason, error = self._route(primary)
        if reason is None:
            timeout = self.primary_timeout_s if timeout_s is None or self.primary_timeout_s is None else timeout_s
            try:
                captions = self._timed(primary, images, options, timeout)
            except InvalidOptionsError:
                raise  # the request's own options: not a model fault
            except TimeoutError as exc:
                reason, error = "primary_timeout", exc
            except Exception as exc:  # any engine failure sends the batch to the fallback
                log.warning("primary failed on a batch of %d: %s", len(images), exc)
                reason, error = "primary_error", exc
            if reason is not None:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            self.observer.breaker(self.breaker.is_open)
            if reason is None:
                return self._replace_degenerate(primary, fallback, images, options, captions)
        if fallback is None:
            detail = f"{reason}: {error}" if error else reason
            raise ModelLoadError(f"primary cannot answer ({detail}) and no fallback model is loaded") from error
        captions = self._timed(fallback, images, options, None)
        self._count(reason, len(images))
        return [Served(c, fallback.info, reason) for c in captions]

    def _route(self, primary: _Lane | None) -> tuple[str | None, Exception | None]:
        """Why the primary is not even tried (None: try it)."""
        if primary is None:
            return "primary_unavailable", None
        if self.breaker.is_open:
            return "circuit_open", None
        if not primary.reserve():
            return "primary_busy", None  # every thread still runs a batch (an overrun): do not queue behind it
        return None, None

    def _timed(self, lane: _Lane, images: list[Any], options: DecodeOptions, timeout_s: float | None) -> list:
        start = time.perf_counter()
        captions = lane.run(images, options, timeout_s)
        self.observer.inference(lane.role, lane.info, time.perf_counter() - start)
        return captions

    def _replace_degenerate(
        self, primary: _Lane, fallback: _Lane | None, images: list[Any], options: DecodeOptions, captions: list
    ) -> list[Served]:
        served = [Served(c, primary.info) for c in captions]
        bad = [(i, r) for i, c in enumerate(captions) if (r := degenerate_reason(c.caption))]
        if not bad or fallback is None:
            return served
        try:
            redo = self._timed(fallback, [images[i] for i, _ in bad], options, None)
        except Exception as exc:  # keep the primary's caption rather than fail the batch
            log.warning("fallback failed replacing degenerate captions: %s", exc)
            return served
        for (i, r), c in zip(bad, redo, strict=True):
            served[i] = Served(c, fallback.info, f"degenerate_{r}")
            self._count(f"degenerate_{r}", 1)
        return served

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
