"""BLIP's official training augmentations on PIL images: RandomResizedCrop(scale 0.5-1, bicubic), horizontal
flip and RandAugment(2, 5) over BLIP's op list. Written with PIL and numpy (no torchvision here).

Every random choice comes from the ``numpy.random.Generator`` passed in, which the dataset derives from
(seed, epoch, index): an augmented sample is the same however many workers or processes run, and a resumed
run sees exactly the images it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .config import AugmentConfig

_FILL = (128, 128, 128)


def random_resized_crop(
    img: Image.Image, size: int, rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    side = min(w, h)  # fallback: centre crop, as torchvision does
    x, y = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side))


def _signed(rng: np.random.Generator, v: float) -> float:
    return v if rng.random() < 0.5 else -v


def _affine(img: Image.Image, matrix) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


def _ops(m: int) -> dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]]:
    level = m / 10.0
    return {
        "Identity": lambda im, r: im,
        "AutoContrast": lambda im, r: ImageOps.autocontrast(im),
        "Equalize": lambda im, r: ImageOps.equalize(im),
        "Brightness": lambda im, r: ImageEnhance.Brightness(im).enhance(1 + _signed(r, 0.9 * level)),
        "Sharpness": lambda im, r: ImageEnhance.Sharpness(im).enhance(1 + _signed(r, 0.9 * level)),
        "ShearX": lambda im, r: _affine(im, (1, _signed(r, 0.3 * level), 0, 0, 1, 0)),
        "ShearY": lambda im, r: _affine(im, (1, 0, 0, _signed(r, 0.3 * level), 1, 0)),
        "TranslateX": lambda im, r: _affine(im, (1, 0, _signed(r, 0.1 * level * im.width), 0, 1, 0)),
        "TranslateY": lambda im, r: _affine(im, (1, 0, 0, 0, 1, _signed(r, 0.1 * level * im.height))),
        "Rotate": lambda im, r: im.rotate(_signed(r, 30 * level), resample=Image.BILINEAR, fillcolor=_FILL),
    }


def rand_augment(img: Image.Image, rng: np.random.Generator, n: int = 2, m: int = 5) -> Image.Image:
    """BLIP's RandomAugment: ``n`` ops drawn from its list, each applied with probability 0.5."""
    ops = _ops(m)
    names = list(ops)
    for i in rng.choice(len(names), size=n):
        if rng.random() < 0.5:
            img = ops[names[i]](img, rng)
    return img


def underwater_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-render an in-air image as underwater with randomly drawn water (ReefScenes' optics model)."""
    from reefcap.models.reefscenes.optics import underwater

    return underwater(img, rng=rng)


class TrainTransform:
    """Picklable train-time transform: crop + flip + RandAugment (+ optional underwater rendering)."""

    def __init__(self, size: int, config: AugmentConfig, underwater: Callable | None = underwater_augment) -> None:
        self.size = size
        self.config = config
        self.underwater = underwater

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        cfg = self.config
        if self.underwater is not None and cfg.underwater_p > 0 and rng.random() < cfg.underwater_p:
            img = self.underwater(img, rng)
        if not cfg.enabled:
            return img.resize((self.size, self.size), Image.BICUBIC)
        img = random_resized_crop(img, self.size, rng, scale=tuple(cfg.crop_scale))
        if cfg.flip and rng.random() < 0.5:
            img = ImageOps.mirror(img)
        if cfg.randaug_n > 0:
            img = rand_augment(img, rng, cfg.randaug_n, cfg.randaug_m)
        return img
