"""Request-level captioning: decode off the event loop, measure input quality, batch, record.

Route handlers call :meth:`CaptionService.caption` and hold no captioning logic themselves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from reefcap.models.engine import DecodeOptions
from reefcap.models.images import ImageLimits, load_image
from reefcap.models.quality import uciqe, uiqm

from .batcher import DeadlineExceededError, DynamicBatcher
from .feedback import FeedbackStore, stored_image
from .metrics import Metrics
from .pool import ModelPool, Served
from .settings import ServerSettings

log = logging.getLogger("reefcap.server")
# UIQM/UCIQE are measured on a copy reduced by a whole factor (box filter) to at most this many pixels a side:
# bounded cost (about 1 ms on this project's 2-core CI machine) whatever the upload.
QUALITY_SIDE = 128


@dataclass
class DecodedUpload:
    """One uploaded image, decoded, with the bytes kept for feedback and its input quality."""

    image: Image.Image
    stored: bytes
    ext: str
    uiqm: float
    uciqe: float


def quality_copy(image: Image.Image) -> Image.Image:
    """The image reduced by the smallest whole factor that brings both sides to QUALITY_SIDE or less."""
    factor = math.ceil(max(image.size) / QUALITY_SIDE)
    return image.reduce(factor) if factor > 1 else image


def decode_one(data: bytes, limits: ImageLimits, index: int) -> DecodedUpload:
    """Decode and measure one upload (runs on a decoding thread). Raises a typed ImageError."""
    image = load_image(data, limits, name=f"image {index}")
    small = np.asarray(quality_copy(image))  # one uint8 array for both measures
    stored, ext = stored_image(data, image)
    return DecodedUpload(image, stored, ext, round(uiqm(small), 4), round(uciqe(small), 4))


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
                    "water_type": s.caption.water_type,
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
        if s.caption.water_type:  # water-type experts only: their estimate for this image
            m.water_types.labels(model=s.info.name, water_type=s.caption.water_type["label"]).inc()
        m.uiqm.observe(d.uiqm)
        m.uciqe.observe(d.uciqe)

    async def add_feedback(self, request_id: str, index: int, references: list[str]) -> dict[str, Any]:
        """Store references and refresh the model's rolling BLEU-4/CIDEr (computed on a worker thread)."""
        model = await asyncio.to_thread(self.store.add, request_id, index, references)
        self.metrics.feedback.inc(len(references))
        scores = await asyncio.to_thread(self.store.rolling_scores, model, self.settings.feedback_window)
        for metric in ("Bleu_4", "CIDEr"):
            if metric in scores:
                self.metrics.quality.labels(model, metric, "feedback", "rolling").set(scores[metric])
        return {"model": model, "rolling": scores}
