"""The one dynamic batcher every captioning request goes through.

Two knobs: ``max_batch_size`` and ``max_wait_s``, counted from the oldest queued image (so a lone request
waits at most ``max_wait_s`` and a busy server forms full batches). Images asking for different decoding
options never share a batch; the cheapest options queued go first (until the oldest image has waited
``starve_s``) and a batch holds at most ``max_batch_cost`` of decoding work, so one client's 16-beam requests
cannot hold everyone else's default ones behind them. The queue is bounded (full -> :class:`QueueFullError`,
answered 503 with Retry-After), each request has a deadline (-> :class:`DeadlineExceededError`, 504), and
the queued images of a request whose client went away are dropped before they cost any inference. Up to
``workers`` batches run at once (the next batch forms while they run). ``close`` drains: it stops taking
work, runs everything already queued and only then returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from PIL import Image

from reefcap.models.engines.base import DecodeOptions

R = TypeVar("R")
Runner = Callable[[list[Image.Image], DecodeOptions], Awaitable[Sequence[R]]]


class BatcherError(Exception):
    """Base class of the batcher's refusals; each maps to one HTTP status in the app."""


class QueueFullError(BatcherError):
    """The bounded queue has no room for the request's images."""


class DeadlineExceededError(BatcherError):
    """The request's deadline passed before all its images were captioned."""


class ClientDisconnectedError(BatcherError):
    """The client went away; its queued images were dropped."""


class ShuttingDownError(BatcherError):
    """The server is draining and takes no new work."""


@dataclass(eq=False)
class _Item:
    image: Image.Image
    options: DecodeOptions
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    running: bool = False


class DynamicBatcher(Generic[R]):
    """Group queued images into batches and hand each batch to ``runner`` (up to ``workers`` in flight).

    ``runner`` must return one result per image, in order; a batch that gets another count fails every
    request in it instead of handing out misattributed captions.
    """

    def __init__(
        self,
        runner: Runner,
        max_batch_size: int = 16,
        max_wait_s: float = 0.01,
        max_queue: int = 256,
        metrics: Any = None,
        max_batch_cost: int | None = None,
        starve_s: float = 1.0,
        workers: int = 1,
    ) -> None:
        """``max_batch_cost``: most decoding work per batch (images x beams x max_length; None: no cap);
        ``starve_s``: how long the oldest image may wait while cheaper work goes first; ``workers``: batches
        handed to ``runner`` at once."""
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1, max_wait_s >= 0 and workers >= 1")
        self.workers = workers
        self.runner = runner
        self.max_batch_cost, self.starve_s = max_batch_cost, starve_s
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._drain: asyncio.Future | None = None
        self._running: set[_Item] = set()  # the batches in flight, failed too if the drain deadline passes
        self._batches: set[asyncio.Task] = set()
        self.batches_run = 0

    @property
    def depth(self) -> int:
        """Images waiting for a batch (not counting the batches in flight)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Images of the running batches not answered yet."""
        return sum(1 for it in self._running if not it.future.done())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="reefcap-batcher")

    async def submit(
        self,
        images: Sequence[Image.Image],
        options: DecodeOptions,
        timeout_s: float,
        disconnected: asyncio.Future | None = None,
    ) -> list[R]:
        """Queue ``images`` and wait for their results, the deadline or the client's disconnect."""
        if self._closing or self._task is None:
            raise ShuttingDownError("the server is shutting down")
        if len(self._queue) + len(images) > self.max_queue:
            self._count_drop("queue_full", len(images))
            raise QueueFullError(f"queue is full ({len(self._queue)} of {self.max_queue} images waiting)")
        loop = asyncio.get_running_loop()
        items = [_Item(im, options, loop.create_future()) for im in images]
        self._queue.extend(items)
        self._set_depth()
        self._wakeup.set()
        gathered = asyncio.gather(*(it.future for it in items))
        waiters: set[asyncio.Future] = {gathered}
        if disconnected is not None:
            waiters.add(disconnected)
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(items, "cancelled")
            gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        if gathered in done:
            return list(gathered.result())
        reason = "disconnected" if disconnected is not None and disconnected in done else "deadline"
        self._abandon(items, reason)
        gathered.cancel()
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
        if reason == "disconnected":
            raise ClientDisconnectedError("client disconnected")
        raise DeadlineExceededError(f"not captioned within the {timeout_s:g} s deadline")

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking work, finish everything queued (up to ``drain_timeout_s``, fractions honoured; 0 does
        not wait), then stop the loop. Images still queued or running at the deadline fail with
        :class:`ShuttingDownError` (a JSON 503 ``shutting_down``). Calling it again waits for the same drain."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._close(drain_timeout_s))
        await asyncio.shield(self._drain)

    async def _close(self, drain_timeout_s: float) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), max(drain_timeout_s, 0.0))
        except TimeoutError:
            self._task.cancel()
            for task in self._batches:
                task.cancel()
            error = ShuttingDownError("the server shut down before this image was captioned")
            for item in [*self._running, *self._queue]:
                if not item.future.done():
                    item.future.set_exception(error)
            self._queue.clear()
            self._set_depth()

    # ---- internals ------------------------------------------------------------------------------

    def _abandon(self, items: list[_Item], reason: str) -> None:
        """Drop the request's images still queued; images already in a running batch finish unobserved."""
        dropped = 0
        for item in items:
            if not item.running and not item.future.done():
                item.future.cancel()
                dropped += 1
        if dropped:
            self._queue = collections.deque(it for it in self._queue if not it.future.done())
            self._set_depth()
            self._count_drop(reason, dropped)
        for item in items:  # results that arrive later must not log "exception never retrieved"
            if item.future.done() and not item.future.cancelled():
                item.future.exception()
            else:
                item.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _count_drop(self, reason: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.dropped.labels(reason=reason).inc(n)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _compatible(self, options: DecodeOptions) -> int:
        return sum(1 for it in self._queue if it.options == options)

    def _pick(self) -> DecodeOptions:
        """The options of the next batch: the cheapest per image queued (first come among equals), so one
        client's expensive decoding does not hold everyone's default requests; the oldest image's once it has
        waited ``starve_s``, so expensive work still runs."""
        oldest = self._queue[0]
        if time.monotonic() - oldest.enqueued >= self.starve_s:
            return oldest.options
        return min((it.options for it in self._queue), key=lambda o: o.num_beams * o.max_length)

    def _limit(self, options: DecodeOptions) -> int:
        """Images per batch for ``options``: ``max_batch_size``, fewer where that would pass ``max_batch_cost``."""
        if self.max_batch_cost is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.max_batch_cost // (options.num_beams * options.max_length)))

    def _take(self, options: DecodeOptions, limit: int) -> list[_Item]:
        batch: list[_Item] = []
        rest: collections.deque[_Item] = collections.deque()
        for item in self._queue:
            if len(batch) < limit and item.options == options:
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        self._set_depth()
        return batch

    async def _loop(self) -> None:
        while True:
            if len(self._batches) >= self.workers:
                # Every slot runs a batch: wait for one to end, so the next batch forms from all queued work.
                await asyncio.wait(self._batches, return_when=asyncio.FIRST_COMPLETED)
                continue
            if not self._queue:
                if self._closing:
                    if self._batches:  # a drain returns only once the running batches have answered
                        await asyncio.wait(self._batches)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            options = self._pick()
            limit = self._limit(options)
            remaining = self._queue[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining > 0 and not self._closing and self._compatible(options) < limit:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                continue
            task = asyncio.get_running_loop().create_task(self._run(self._take(options, limit)))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        for item in batch:
            item.running = True
            if self.metrics is not None:
                self.metrics.queue_wait.observe(now - item.enqueued)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        self.batches_run += 1
        self._running.update(batch)
        try:
            results = list(await self.runner([it.image for it in batch], batch[0].options))
            if len(results) != len(batch):
                raise RuntimeError(f"batch runner returned {len(results)} results for {len(batch)} images")
        except Exception as exc:  # every request in the batch gets the failure, none a wrong caption
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._running.difference_update(batch)
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
