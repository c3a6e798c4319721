"""Training batches: (image, caption) pairs, shuffled per epoch and sharded per process, reproducibly.

The order of epoch ``e`` is a permutation seeded by (seed, e), and each sample's augmentation draws from a
generator seeded by (seed, e, index): batch ``k`` of epoch ``e`` is a pure function of the run's seed, so a
resumed run continues with exactly the batches it would have had, with any number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reefcap.models.data.images import load_dataset_image
from reefcap.models.errors import ReefcapError

from .augment import TrainTransform
from .labels import build_targets


def load_records(path: str | Path) -> list:
    """Caption records of a dataset file (any format issue-3's loader reads)."""
    from reefcap.models.data.datasets import load_dataset

    records = load_dataset(Path(path))
    if not records:
        raise ReefcapError(f"{path}: dataset has no images")
    return records


@dataclass
class ImageCache:
    """Decoded RGB images by path: ReefScenes-sized datasets fit in memory and decoding dominates otherwise."""

    images: dict[Path, Image.Image]

    @classmethod
    def empty(cls) -> ImageCache:
        return cls({})

    def get(self, path: Path) -> Image.Image:
        img = self.images.get(path)
        if img is None:
            img = self.images[path] = load_dataset_image(path)
        return img


class CaptionBatches:
    """Per-process training batches over every (image, caption) pair of ``records``."""

    def __init__(
        self,
        records: Sequence,
        processor,
        transform: TrainTransform,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        max_words: int = 30,
        max_len: int = 40,
    ) -> None:
        self.records = list(records)
        self.pairs = [(i, c) for i, r in enumerate(self.records) for c in r.captions]
        if len(self.pairs) < batch_size * world:
            raise ReefcapError(
                f"{len(self.pairs)} captions are fewer than one global batch ({batch_size} x {world} processes)"
            )
        self.processor, self.transform = processor, transform
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.max_words, self.max_len = max_words, max_len
        self.cache = ImageCache.empty()

    def __len__(self) -> int:
        """Batches per epoch (the last incomplete global batch is dropped, as BLIP's loader does)."""
        return len(self.pairs) // (self.batch_size * self.world)

    def indices(self, epoch: int, k: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        start = (k * self.world + self.rank) * self.batch_size
        return order[start : start + self.batch_size]

    def images(self, epoch: int, idx: Sequence[int], which: Sequence[Path]) -> torch.Tensor:
        out = []
        for i, path in zip(idx, which, strict=True):
            rng = np.random.default_rng([self.seed, epoch, int(i)])
            out.append(self.transform(self.cache.get(path), rng))
        return self.processor.image_processor(images=out, return_tensors="pt")["pixel_values"]

    def batch(self, epoch: int, k: int) -> dict[str, torch.Tensor]:
        idx = self.indices(epoch, k)
        pairs = [self.pairs[i] for i in idx]
        pixel_values = self.images(epoch, idx, [self.records[r].path for r, _ in pairs])
        targets = build_targets(
            self.processor.tokenizer, [c for _, c in pairs], max_words=self.max_words, max_len=self.max_len
        )
        return {"pixel_values": pixel_values, **targets}


class AirImages:
    """In-air images mixed into every batch for knowledge preservation (no captions needed)."""

    def __init__(self, records: Sequence, processor, transform: TrainTransform, per_batch: int, seed: int, rank=0):
        self.paths = [r.path for r in records]
        if not self.paths:
            raise ReefcapError("knowledge preservation needs in-air images (--preserve-data)")
        self.processor, self.transform = processor, transform
        self.per_batch, self.seed, self.rank = per_batch, seed, rank
        self.cache = ImageCache.empty()

    def batch(self, step: int) -> torch.Tensor:
        n = len(self.paths)
        cycle, pos = divmod(step * self.per_batch, n)
        order = np.random.default_rng([self.seed, 7919, self.rank, cycle]).permutation(n)
        idx = [order[(pos + j) % n] for j in range(self.per_batch)]
        imgs = [
            self.transform(self.cache.get(self.paths[i]), np.random.default_rng([self.seed, 7919, step, int(i)]))
            for i in idx
        ]
        return self.processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
