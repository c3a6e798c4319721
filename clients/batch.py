"""Offline batch captioning: the same CaptionEngine the server uses, driven over a list of inputs.

Each input yields one record, in input order: ``{"image", "caption", "model", "confidence"}`` or, for an
input that cannot be decoded, ``{"image", "error", "code"}``. A bad image never stops the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from reefcap.models.engine import CaptionEngine, DecodeOptions
from reefcap.models.errors import ImageError


class BatchCaptioner:
    """Caption many images with one engine, ``batch_size`` at a time."""

    def __init__(self, engine: CaptionEngine, batch_size: int = 16, options: DecodeOptions | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.engine = engine
        self.batch_size = batch_size
        self.options = (options or DecodeOptions()).validate()

    def _flush(self, pending: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        captions = self.engine.caption([im for _, im in pending], self.options)
        return [
            {"image": name, "caption": c.caption, "model": c.model, "confidence": c.confidence}
            for (name, _), c in zip(pending, captions, strict=True)
        ]

    def run(self, inputs: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Yield one record per input path, in order, as soon as its batch is captioned."""
        held: list[dict[str, Any] | None] = []  # records in input order; None marks a slot awaiting its caption
        pending: list[tuple[str, Any]] = []
        for name in inputs:
            try:
                pending.append((name, self.engine.decode(name)))
                held.append(None)
            except ImageError as exc:
                held.append({"image": name, "error": str(exc), "code": exc.code})
            if len(pending) == self.batch_size:
                yield from self._release(held, self._flush(pending))
                held, pending = [], []
        if pending or held:
            yield from self._release(held, self._flush(pending) if pending else [])

    @staticmethod
    def _release(held: list[dict[str, Any] | None], done: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        results = iter(done)
        for record in held:
            yield record if record is not None else next(results)
