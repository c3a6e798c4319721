"""The primary's measured decoding cost, which the server's deadlines and batch sizes follow."""

from __future__ import annotations

import logging
import os

from reefcap.models.engines.base import DecodeOptions

log = logging.getLogger("reefcap.server")
HEAVY_IMAGE_S = 0.1  # inference this slow per image dwarfs decoding and HTTP (about 3 ms an image)


class CostModel:
    """The primary's measured decoding cost, in seconds per unit of work (image x beam x token).

    Seeded by a warm-up batch at start (:meth:`ModelPool.warm_up`) and followed by a running mean of the
    primary's batches, so deadlines grow with a slow machine or a big model instead of mistaking it for a
    failing one. Unmeasured (``unit_s`` None), every budget is the configured floor."""

    def __init__(self, slack: float = 4.0) -> None:
        self.slack = slack
        self.unit_s: float | None = None

    @staticmethod
    def units(images: int, options: DecodeOptions) -> int:
        return max(1, images) * options.num_beams * options.max_length

    def observe(self, images: int, options: DecodeOptions, seconds: float) -> None:
        rate = seconds / self.units(images, options)
        self.unit_s = rate if self.unit_s is None else 0.8 * self.unit_s + 0.2 * rate

    def expected_s(self, images: int, options: DecodeOptions) -> float | None:
        return None if self.unit_s is None else self.unit_s * self.units(images, options)

    def budget(self, floor_s: float, images: int, options: DecodeOptions) -> float:
        """``floor_s``, or ``slack`` times the expected time of ``images`` if that is longer."""
        expected = self.expected_s(images, options)
        return floor_s if expected is None else max(floor_s, self.slack * expected)

    def queue_budget(
        self, floor_s: float, images: int, options: DecodeOptions, max_batch: int, workers: int = 1
    ) -> float:
        """``floor_s``, or ``slack`` times the expected time of ``images`` queued and running as the batcher runs
        them: batches of at most ``max_batch``, ``workers`` at a time, each round as long as its largest batch.
        (One batch of every image ahead, the earlier estimate, ignored both the rounds and the parallel lanes.)"""
        one = self.expected_s(min(max(1, images), max_batch), options)
        if one is None:
            return floor_s
        batches = -(-max(1, images) // max_batch)
        rounds = -(-batches // max(1, workers))
        return max(floor_s, self.slack * rounds * one)

    def batch_cap(self, max_batch: int, target_s: float, options: DecodeOptions) -> int:
        """The largest batch (at most ``max_batch``) expected to take no more than ``target_s``."""
        one = self.expected_s(1, options)
        return max_batch if not one else max(1, min(max_batch, int(target_s / one)))


def choose_workers(cost: CostModel, workers: int, options: DecodeOptions) -> int:
    """Batches in flight: ``workers``, or with 0 (automatic) two for a primary the warm-up measured cheap on
    two cores or more, else one. A cheap model runs each batch on one intra-op thread, so one batch at a time
    left a core idle at 32 connections; a heavy one already has every core (the loader's thread policy), and an
    unmeasured one (no warm-up) keeps the single batch."""
    if workers:
        return workers
    one = cost.expected_s(1, options)
    if (os.cpu_count() or 1) < 2 or one is None or one >= HEAVY_IMAGE_S:
        return 1
    log.info("the primary takes %.3f s an image: two batches in flight", one)
    return 2
