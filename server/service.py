"""Request-level captioning: decode (small images on the event loop, the rest on decoding threads), measure input
quality, batch, record.

Route handlers call :meth:`CaptionService.caption` and hold no captioning logic themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from reefcap.models.data.images import ImageLimits, finish_decoding, open_encoded
from reefcap.models.engines.base import DecodeOptions
from reefcap.models.errors import InvalidOptionsError
from reefcap.models.policy import CaptionResult
from reefcap.models.quality import input_quality

from .batcher import DeadlineExceededError, DynamicBatcher
from .feedback import FeedbackStore, stored_image
from .metrics import Metrics
from .pool import ModelPool
from .settings import ServerSettings

log = logging.getLogger("reefcap.server")
RECORD_WAIT_S = 5.0  # longest a caption answer waits for its served images to be committed (then it goes anyway)
# A request whose images hold at most this many pixels in all (four 256 x 256 photos) is decoded on the event loop:
# about 1.6 ms of decoding, while handing it to a decoding thread and back cost 0.21 ms of CPU a request on 2 vCPUs
# (1.21 -> 0.99 ms per request for everything but the model). Larger ones, and any measured for quality (about
# 2.7 ms), go to the threads, so no upload holds the loop long.
INLINE_PIXELS = 1 << 18


@dataclass
class DecodedUpload:
    """One uploaded image, decoded, with the bytes kept for feedback and its input quality."""

    image: Image.Image
    stored: bytes
    ext: str
    uiqm: float | None  # None: not measured, or too small to measure (the caption is served all the same)
    uciqe: float | None


def decode_one(data: bytes, limits: ImageLimits, index: int, measure: bool = True) -> DecodedUpload:
    """Decode one upload and, with ``measure``, its UIQM/UCIQE. Raises a typed ImageError."""
    name = f"image {index}"
    return finish_upload(open_encoded(data, limits, name), data, limits, name, measure)


def finish_upload(opened: Image.Image, data: bytes, limits: ImageLimits, name: str, measure: bool) -> DecodedUpload:
    """The pixels of an upload whose header :func:`open_encoded` read, and with ``measure`` its UIQM/UCIQE."""
    image = finish_decoding(opened, data, limits, name)
    stored, ext = stored_image(data, image)
    if not measure:  # about a third of the server's CPU per image on the tiny model: only when wanted
        return DecodedUpload(image, stored, ext, None, None)
    quality = input_quality(image)  # the library's, so `reefcap caption --quality` gives the same numbers
    return DecodedUpload(image, stored, ext, quality["uiqm"], quality["uciqe"])


class CaptionService:
    """Owns the batcher, the decoding threads and the feedback store for one app."""

    def __init__(
        self,
        settings: ServerSettings,
        pool: ModelPool,
        metrics: Metrics,
        store: FeedbackStore,
        wait_for_records: bool = False,
    ) -> None:
        """``wait_for_records``: answer a caption request only once its served images are committed, because
        another process sharing the store may be asked for their feedback next (several workers or servers)."""
        self.settings = settings
        self.wait_for_records = wait_for_records
        self.pool = pool
        self.metrics = metrics
        self.store = store
        store.max_references = settings.feedback_max_references
        self.limits = settings.image_limits
        workers = settings.decode_workers or max(1, (os.cpu_count() or 1) // 2)
        self.decoder = ThreadPoolExecutor(workers, thread_name_prefix="reefcap-decode")
        self.batcher: DynamicBatcher[CaptionResult] = DynamicBatcher(
            pool.caption_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            metrics=metrics,
            # A full batch of default requests is the most work one batch may hold: a request asking for more
            # per image runs in smaller batches (its own cost), between other clients' batches.
            max_batch_cost=settings.max_batch_size * settings.num_beams * settings.max_length,
            workers=pool.workers,
        )
        # Images whose request did not ask for quality are measured at this rate, for the Prometheus histograms;
        # starting full, so the first image of a fresh server is measured.
        self._quality_credit = 1.0
        self._quality_budget, self._quality_refilled = 1.0, time.monotonic()  # the per-second cap's bucket
        self.default_options = DecodeOptions(num_beams=settings.num_beams, max_length=settings.max_length)
        # A model measured slow at start gets smaller batches: one batch of default requests is expected to
        # fit in the configured primary timeout, so no request waits behind a minutes-long batch (smaller
        # still would cost throughput: a blip-base-shape cut to batches of one was 2x slower under load).
        self.batcher.max_batch_size = pool.cost.batch_cap(
            settings.max_batch_size, settings.primary_timeout_s, self.default_options
        )

    def start(self) -> None:
        self.batcher.start()
        self._publish_stored_scores()

    def _publish_stored_scores(self) -> None:
        """Export the rolling scores the feedback database already holds, so /metrics (and the web page) show
        them from the start rather than only after the next feedback post. Milliseconds per model."""
        try:
            for model in self.store.models_with_feedback():
                self._set_rolling(model, self.store.rolling_scores(model, self.settings.feedback_window))
        except Exception as exc:  # a damaged database must not keep the server from serving
            log.error("could not read the rolling scores from the feedback database: %s", exc)

    def _set_rolling(self, model: str, scores: dict[str, float | int]) -> None:
        # A score not yet meaningful (CIDEr over fewer than ten images) is absent: no gauge rather than a 0 that
        # misleads. A model's window never holds fewer images than before, so a gauge once set stays meaningful.
        for metric in ("Bleu_4", "CIDEr"):
            if metric in scores:
                self.metrics.quality.labels(model, metric, "feedback", "rolling").set(scores[metric])

    async def drain(self) -> None:
        """Stop taking requests and finish the queued ones within ``drain_timeout_s`` (the rest get 503)."""
        await self.batcher.close(self.settings.drain_timeout_s)

    async def close(self) -> None:
        await self.drain()
        self.decoder.shutdown(wait=False)
        self.pool.close()

    def options(self, overrides: dict[str, Any] | None) -> DecodeOptions:
        """The server defaults with the request's overrides, checked against the loaded models' limits
        (their text positions): :class:`InvalidOptionsError` (422) naming the limit, before anything queues."""
        return self.pool.policy.check_options(self.default_options.merged(**(overrides or {})))

    def check_cost(self, images: int, options: DecodeOptions) -> None:
        """Refuse (422, naming the limit) a request whose decoding work, images x beams x max_length, is over
        ``max_request_cost``: one client's request must not hold every other client's batches for seconds."""
        cost = images * options.num_beams * options.max_length
        limit = self.settings.max_request_cost
        if cost > limit:
            raise InvalidOptionsError(
                f"request cost {cost} ({images} images x num_beams {options.num_beams} x max_length "
                f"{options.max_length}) is over the server's limit of {limit} (REEFCAP_MAX_REQUEST_COST); "
                "send fewer images per request or decode with fewer beams or tokens"
            )

    async def caption(
        self,
        uploads: list[bytes],
        options: DecodeOptions,
        request_id: str,
        disconnected: asyncio.Future | None = None,
        quality: bool = False,
    ) -> list[dict[str, Any]]:
        """Caption every upload of one request; one result dict per upload, in order. With ``quality`` each
        result has the image's UIQM/UCIQE; without, ``"quality"`` is null (a sample is measured for /metrics)."""
        self.check_cost(len(uploads), options)
        start = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s
        decoded = await self._decode(uploads, quality)
        # The deadline follows the model's measured cost: never shorter than slack x the expected time of the
        # work queued and running ahead of this request, and its own (a slow model is not a failing one).
        ahead = self.batcher.depth + self.batcher.in_flight + len(uploads)
        work = self.pool.cost.queue_budget(0.0, ahead, options, self.batcher.max_batch_size, self.pool.workers)
        remaining = max(deadline - time.monotonic(), work)
        if remaining <= 0:
            raise DeadlineExceededError("the deadline passed while decoding")
        served: list[CaptionResult] = await self.batcher.submit(
            [d.image for d in decoded], options, remaining, disconnected=disconnected
        )
        latency_ms = round((time.perf_counter() - start) * 1000, 2)
        results = []
        for i, (d, s) in enumerate(zip(decoded, served, strict=True)):
            self._observe(d, s)
            measured = {"uiqm": d.uiqm, "uciqe": d.uciqe} if quality else None
            results.append(s.replace(index=i, latency_ms=latency_ms, quality=measured).to_dict())
        done = self._record(request_id, decoded, served)
        if done is not None and self.wait_for_records:
            await self._committed(done, request_id)
        return results

    async def _decode(self, uploads: list[bytes], quality: bool) -> list[DecodedUpload]:
        """Every upload decoded, in order; headers are read (and refused) here, pixels where INLINE_PIXELS says."""
        names = [f"image {i}" for i in range(len(uploads))]
        opened = [open_encoded(data, self.limits, name) for data, name in zip(uploads, names, strict=True)]
        measure = [quality or self._sample() for _ in uploads]
        work = list(zip(opened, uploads, names, measure, strict=True))
        if not any(measure) and sum(im.width * im.height for im in opened) <= INLINE_PIXELS:
            return [finish_upload(im, data, self.limits, name, m) for im, data, name, m in work]
        loop = asyncio.get_running_loop()
        jobs = (loop.run_in_executor(self.decoder, finish_upload, im, d, self.limits, n, m) for im, d, n, m in work)
        return list(await asyncio.gather(*jobs))

    async def _committed(self, done: Future, request_id: str) -> None:
        try:  # shielded: the commit is shared by the whole group of requests, never cancelled by one of them
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), RECORD_WAIT_S)
        except Exception as exc:  # the caption is served all the same
            log.warning("served images of request %s not confirmed written: %s", request_id, exc or type(exc).__name__)

    def _sample(self) -> bool:
        """Whether to measure an image nobody asked the quality of: ``quality_sample_rate`` of them, evenly spread,
        and at most ``quality_samples_per_s`` a second (a token bucket holding one second's worth)."""
        measure = self._quality_credit >= 1.0
        self._quality_credit += self.settings.quality_sample_rate - measure
        cap = self.settings.quality_samples_per_s
        if not measure or not cap:
            return measure
        now = time.monotonic()
        self._quality_budget = min(max(cap, 1.0), self._quality_budget + (now - self._quality_refilled) * cap)
        self._quality_refilled = now
        if self._quality_budget < 1.0:
            return False
        self._quality_budget -= 1.0
        return True

    def _record(self, request_id: str, decoded: list[DecodedUpload], served: list[CaptionResult]) -> Future | None:
        """Queue the served images for feedback (the store writes behind); done when they are committed."""
        rows = [
            {
                "idx": i,
                "model": s.model.name,
                "version": s.model.version,
                "caption": s.caption,
                "fallback_reason": s.fallback_reason,
                "image": d.stored,
                "ext": d.ext,
                "width": d.image.width,
                "height": d.image.height,
            }
            for i, (d, s) in enumerate(zip(decoded, served, strict=True))
        ]
        try:  # the caption is served even if the feedback record cannot be kept
            return self.store.record_served(request_id, rows)
        except Exception as exc:
            log.error("could not record request %s for feedback: %s", request_id, exc)
            return None

    def _observe(self, d: DecodedUpload, s: CaptionResult) -> None:
        m = self.metrics
        m.images.labels(model=s.model.name).inc()
        m.caption_words.observe(len(s.caption.split()))
        m.confidence.observe(s.confidence)
        if s.route is not None:  # a routed primary: where the router sent this image
            m.routes.labels(domain=s.route.domain, model=s.route.model).inc()
        if s.water_type:  # water-type experts only: their estimate for this image
            m.water_types.labels(model=s.model.name, water_type=s.water_type["label"]).inc()
        if d.uiqm is not None:
            m.uiqm.observe(d.uiqm)
        if d.uciqe is not None:
            m.uciqe.observe(d.uciqe)

    async def add_feedback(self, request_id: str, index: int, references: list[str]) -> dict[str, Any]:
        """Store references and update the model's rolling BLEU-4/CIDEr (bounded work, on a worker thread).

        The answer's ``rolling`` is :meth:`FeedbackStore.rolling_scores`: the image and reference counts the
        scores come from, and CIDEr only from ten images with references on."""
        added = await asyncio.to_thread(self.store.add, request_id, index, references)
        model = added["model"]
        self.metrics.feedback.inc(added["stored"])
        scores = await asyncio.to_thread(self.store.rolling_scores, model, self.settings.feedback_window)
        self._set_rolling(model, scores)
        return {**added, "rolling": scores}
