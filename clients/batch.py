"""Offline batch captioning: the same engines and captioning policy the server uses (primary, fallback,
degenerate-caption replacement, circuit breaker: :mod:`reefcap.models.policy.captioning`), driven over a list of inputs.

Each input yields one record, in input order: the library's :class:`~reefcap.models.policy.results.CaptionResult`
as JSON, the shape the server answers with (``image``, ``caption``, ``model`` ``{name, version, backend}``,
``fallback`` ``{used, reason}``, ``confidence``, ``tokens``, ``water_type``, ``quality``: the input's ``{"uiqm",
"uciqe"}`` with ``quality``, else null) or, for an input that cannot be decoded, ``{"image", "error", "code"}``.
A bad image never stops the run. Images are decoded on a thread pool one
batch ahead, so decoding overlaps the model's work on the previous batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

from reefcap.models.engines.base import CaptionEngine, DecodeOptions, require_positive
from reefcap.models.errors import ImageError
from reefcap.models.policy import CaptionPolicy, as_policy
from reefcap.models.quality import input_quality


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def error_record(name: str, exc: ImageError) -> dict[str, Any]:
    return {"image": name, "error": str(exc), "code": exc.code}


class BatchCaptioner:
    """Caption many images, ``batch_size`` at a time, decoding on ``workers`` threads.

    ``engine`` is a :class:`CaptionPolicy` (what ``reefcap caption`` builds) or a bare engine (a policy with
    no fallback).
    """

    def __init__(
        self,
        engine: CaptionEngine | CaptionPolicy,
        batch_size: int = 16,
        options: DecodeOptions | None = None,
        workers: int | None = None,
        quality: bool = False,
    ) -> None:
        self.policy = as_policy(engine)
        self.quality = quality  # add each input's UIQM/UCIQE, measured on the decoding threads
        self.batch_size = require_positive("batch_size", batch_size)
        self.options = (options or DecodeOptions()).validate()
        self.workers = default_workers() if workers is None else require_positive("workers", workers)

    def _decode(self, name: str) -> Any:
        """The decoded image (with its quality when asked for), or the ImageError to report for it."""
        try:
            image = self.policy.decode(name)
        except ImageError as exc:
            return exc
        if not self.quality:
            return image, None
        try:
            return image, input_quality(image)
        except ImageError:  # too small to measure (under 2 px a side): still captioned, quality unknown
            return image, {"uiqm": None, "uciqe": None}

    def _caption(self, names: list[str], decoded: list[Any]) -> list[dict[str, Any]]:
        good = [(n, d[0]) for n, d in zip(names, decoded, strict=True) if not isinstance(d, ImageError)]
        captions = iter(self.policy.caption([im for _, im in good], self.options) if good else [])
        records = []
        for n, d in zip(names, decoded, strict=True):
            if isinstance(d, ImageError):
                records.append(error_record(n, d))
                continue
            records.append(next(captions).replace(image=n, quality=d[1]).to_dict())
        return records

    def run_batches(self, inputs: Iterable[str]) -> Iterator[list[dict[str, Any]]]:
        """Yield the records of each batch, in input order, as soon as the batch is captioned."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="reefcap-decode") as pool:
            ahead: tuple[list[str], list[Future]] | None = None
            for names in batched(inputs, self.batch_size):
                submitted = (names, [pool.submit(self._decode, n) for n in names])
                if ahead is not None:
                    yield self._caption(ahead[0], [f.result() for f in ahead[1]])
                ahead = submitted
            if ahead is not None:
                yield self._caption(ahead[0], [f.result() for f in ahead[1]])

    def run(self, inputs: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Yield one record per input, in order."""
        for records in self.run_batches(inputs):
            yield from records
