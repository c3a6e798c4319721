"""Request-level captioning: decode off the event loop, measure input quality, batch, record.

Route handlers call :meth:`CaptionService.caption` and hold no captioning logic themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from reefcap.models.engine import DecodeOptions
from reefcap.models.images import ImageLimits, load_image
from reefcap.models.quality import input_quality

from .batcher import DeadlineExceededError, DynamicBatcher
from .feedback import FeedbackStore, stored_image
from .metrics import Metrics
from .pool import ModelPool, Served
from .settings import ServerSettings

log = logging.getLogger("reefcap.server")


@dataclass
class DecodedUpload:
    """One uploaded image, decoded, with the bytes kept for feedback and its input quality."""

    image: Image.Image
    stored: bytes
    ext: str
    uiqm: float | None  # None: too small to measure (the caption is served all the same)
    uciqe: float | None


def decode_one(data: bytes, limits: ImageLimits, index: int) -> DecodedUpload:
    """Decode and measure one upload (runs on a decoding thread). Raises a typed ImageError."""
    image = load_image(data, limits, name=f"image {index}")
    quality = input_quality(image)  # the library's, so `reefcap caption --quality` gives the same numbers
    stored, ext = stored_image(data, image)
    return DecodedUpload(image, stored, ext, quality["uiqm"], quality["uciqe"])


class CaptionService:
    """Owns the batcher, the decoding threads and the feedback store for one app."""

    def __init__(self, settings: ServerSettings, pool: ModelPool, metrics: Metrics, store: FeedbackStore) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.store = store
        self.limits = settings.image_limits
        workers = settings.decode_workers or max(1, (os.cpu_count() or 1) // 2)
        self.decoder = ThreadPoolExecutor(workers, thread_name_prefix="reefcap-decode")
        self.batcher: DynamicBatcher[Served] = DynamicBatcher(
            pool.caption_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            metrics=metrics,
        )
        self.default_options = DecodeOptions(num_beams=settings.num_beams, max_length=settings.max_length)

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

    def _set_rolling(self, model: str, scores: dict[str, float]) -> None:
        for metric in ("Bleu_4", "CIDEr"):
            if metric in scores:
                self.metrics.quality.labels(model, metric, "feedback", "rolling").set(scores[metric])

    async def close(self) -> None:
        await self.batcher.close(self.settings.drain_timeout_s)
        self.decoder.shutdown(wait=False)
        self.pool.close()

    def options(self, overrides: dict[str, Any] | None) -> DecodeOptions:
        """The server defaults with the request's overrides; raises ValueError for invalid values."""
        return self.default_options.merged(**(overrides or {})).validate()

    async def caption(
        self,
        uploads: list[bytes],
        options: DecodeOptions,
        request_id: str,
        disconnected: asyncio.Future | None = None,
    ) -> list[dict[str, Any]]:
        """Caption every upload of one request; one result dict per upload, in order."""
        start = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s
        loop = asyncio.get_running_loop()
        decoded: list[DecodedUpload] = await asyncio.gather(
            *(loop.run_in_executor(self.decoder, decode_one, data, self.limits, i) for i, data in enumerate(uploads))
        )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError("the deadline passed while decoding")
        served: list[Served] = await self.batcher.submit(
            [d.image for d in decoded], options, remaining, disconnected=disconnected
        )
        latency_ms = round((time.perf_counter() - start) * 1000, 2)
        results = []
        for i, (d, s) in enumerate(zip(decoded, served, strict=True)):
            self._observe(d, s)
            results.append(
                {
                    "index": i,
                    "caption": s.caption.caption,
                    "model": {"name": s.info.name, "version": s.info.version, "backend": s.info.backend},
                    "fallback": s.fallback,
                    "confidence": s.caption.confidence,
                    "tokens": s.caption.tokens,
                    "latency_ms": latency_ms,
                    "quality": {"uiqm": d.uiqm, "uciqe": d.uciqe},
                }
            )
        rows = [
            {
                "idx": i,
                "model": s.info.name,
                "version": s.info.version,
                "caption": s.caption.caption,
                "fallback_reason": s.fallback_reason,
                "image": d.stored,
                "ext": d.ext,
                "width": d.image.width,
                "height": d.image.height,
            }
            for i, (d, s) in enumerate(zip(decoded, served, strict=True))
        ]
        try:  # the caption is served even if the feedback record cannot be kept (the store writes behind)
            self.store.record_served(request_id, rows)
        except Exception as exc:
            log.error("could not record request %s for feedback: %s", request_id, exc)
        return results

    def _observe(self, d: DecodedUpload, s: Served) -> None:
        m = self.metrics
        m.images.labels(model=s.info.name).inc()
        m.caption_words.observe(len(s.caption.caption.split()))
        m.confidence.observe(s.caption.confidence)
        if d.uiqm is not None:
            m.uiqm.observe(d.uiqm)
        if d.uciqe is not None:
            m.uciqe.observe(d.uciqe)

    async def add_feedback(self, request_id: str, index: int, references: list[str]) -> dict[str, Any]:
        """Store references and refresh the model's rolling BLEU-4/CIDEr (computed on a worker thread)."""
        model = await asyncio.to_thread(self.store.add, request_id, index, references)
        self.metrics.feedback.inc(len(references))
        scores = await asyncio.to_thread(self.store.rolling_scores, model, self.settings.feedback_window)
        self._set_rolling(model, scores)
        return {"model": model, "rolling": scores}
