"""The policy's moving parts: where an engine's batches run (:class:`Lane`), the circuit breaker, and the
observer the policy reports to (the server's feeds Prometheus)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineInfo
from reefcap.models.errors import ReefcapError

log = logging.getLogger("reefcap.policy")

DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_RESET_S = 30.0


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


class Lane:
    """An engine in its role, and the ``workers`` threads its batches run on when they run off the caller's
    thread: with a timeout (an overrunning batch finishes in the background while the fallback answers), and
    always from the server's event loop. Engines serve concurrent ``caption`` calls, so ``workers`` batches may
    run at once (the server runs two on a small model, each on its own core)."""

    def __init__(self, engine: CaptionEngine, role: str, workers: int = 1) -> None:
        self.engine, self.role, self.info = engine, role, engine.describe()
        self.workers = max(1, workers)
        # Threads start on first use: an offline run that captions inline never starts one.
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix=f"reefcap-{role}")
        self.busy = 0  # batches reserved and not finished (an overrun keeps this above zero)
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Claim a thread for one batch; False when every thread still runs one (so it would queue behind
        an overrun). Checked and claimed under one lock: two batches cannot both take the last thread."""
        with self._lock:
            if self.busy >= self.workers:
                return False
            self.busy += 1
            return True

    def submit(self, images: list[Any], options: DecodeOptions, reserved: bool) -> Future[list[Caption]]:
        """Caption on one of this lane's threads; ``reserved``: a thread claimed by :meth:`reserve`, released
        when the batch ends (however long it runs)."""

        def work() -> list[Caption]:
            try:
                return self.engine.caption(images, options)
            finally:
                if reserved:
                    with self._lock:
                        self.busy -= 1

        return self.executor.submit(work)

    def run(self, images: list[Any], options: DecodeOptions, timeout_s: float | None, reserved: bool) -> list:
        """Caption from a blocking caller: inline without a timeout, else on a lane thread, waiting at most
        ``timeout_s`` (on a timeout the batch keeps running there; only the waiting stops)."""
        if timeout_s is None:
            try:
                return self.engine.caption(images, options)
            finally:
                self.release(reserved)
        return self.submit(images, options, reserved).result(timeout_s)

    async def run_async(self, images: list[Any], options: DecodeOptions, timeout_s: float | None, reserved: bool):
        """Caption from the event loop: the batch's one thread handoff. :class:`TimeoutError` after ``timeout_s``
        (the batch keeps running on its thread)."""
        future = self.submit(images, options, reserved)
        waiter = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({waiter}, timeout=timeout_s)
        if not done:
            # Retrieve the late outcome so an overrun that then fails is not reported as never retrieved.
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise TimeoutError(f"{self.role} batch of {len(images)} took over {timeout_s:.3g} s")
        return waiter.result()

    def release(self, reserved: bool) -> None:
        if reserved:
            with self._lock:
                self.busy -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False)  # the threads end after any batch they are running
