"""Fast ``pixel_values`` for BLIP's image processor, bit-identical to transformers' PIL backend.

The processor's PIL backend converts each image to a channels-first array, back to PIL to resize it, to float64
to rescale and to float32 to normalise, one image at a time. On the tiny bundled model that was 40 % of a
batch's time on a 2-core CPU. This does the same arithmetic once per batch: PIL resize per image, then one
float64 rescale, one float32 cast and one float32 normalisation of the stacked batch. It only takes the
configuration it reproduces exactly (fixed height x width resize, rescale, normalise, no crop or pad) and
otherwise returns None so callers use the processor itself; ``tests/test_pixels.py`` checks bit equality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


class FastPixels:
    """Batch preprocessing for one processor's settings; build with :meth:`for_processor`."""

    def __init__(self, size: tuple[int, int], resample: int, scale: float, mean: Any, std: Any) -> None:
        self.height, self.width = size
        self.resample = Image.Resampling(resample)
        self.scale = scale
        # As transformers' normalize: mean and std in the image's dtype (float32), shaped for channels last here.
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def for_processor(cls, processor: Any) -> FastPixels | None:
        """The fast path for ``processor`` (a BLIP image processor), or None if it does anything else."""
        get = lambda name, default=None: getattr(processor, name, default)  # noqa: E731
        size = get("size")
        height = size.get("height") if hasattr(size, "get") else None
        width = size.get("width") if hasattr(size, "get") else None
        mean, std = get("image_mean"), get("image_std")
        simple = (
            get("do_resize") is True
            and get("do_rescale") is True
            and get("do_normalize") is True
            and get("do_convert_rgb") in (True, None)
            and not get("do_center_crop")
            and not get("do_pad")
            and isinstance(height, int)
            and isinstance(width, int)
            and isinstance(get("resample"), int)
            and isinstance(get("rescale_factor"), float)
            and mean is not None
            and std is not None
            and len(mean) == 3
            and len(std) == 3
        )
        if not simple:
            return None
        return cls((height, width), get("resample"), get("rescale_factor"), mean, std)

    @staticmethod
    def accepts(images: Sequence[Image.Image]) -> bool:
        """Whether every image is plain RGB (the processor's own RGB conversion handles the rest)."""
        return all(image.mode == "RGB" for image in images)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """An (N, 3, H, W) float32 batch, as ``processor(images=..., return_tensors="np")["pixel_values"]``."""
        out = np.empty((len(images), self.height, self.width, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            if image.mode != "RGB":  # transformers composites alpha on white: leave those to the processor
                raise ValueError(f"fast path takes RGB images, got mode {image.mode}")
            if image.size != (self.width, self.height):
                image = image.resize((self.width, self.height), resample=self.resample)
            out[i] = np.asarray(image)
        pixels = (out.astype(np.float64) * self.scale).astype(np.float32)
        pixels -= self.mean
        pixels /= self.std
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
