"""The fast batch preprocessing gives exactly the processor's pixel values, and steps aside when it cannot."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from reefcap.models.engines.pixels import FastPixels
from reefcap.models.registry import zoo_models


@pytest.fixture(scope="module")
def processor() -> BlipImageProcessorPil:
    return BlipImageProcessorPil.from_pretrained(zoo_models()["reefscenes-tiny-damf"])


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(96, 96), (50, 300), (1000, 37), (97, 95), (3, 3)]  # exact size, wide, tall, off by one, tiny
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_bit_identical_to_the_processor(processor, euvp_images):
    images = [Image.open(p).convert("RGB") for p in euvp_images] + _odd_images()
    fast = FastPixels.for_processor(processor)
    assert fast is not None
    want = processor(images=images, return_tensors="np")["pixel_values"]
    got = fast(images)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape == (len(images), 3, 96, 96)
    assert np.array_equal(got, want)


def test_other_modes_and_settings_are_left_to_the_processor(processor):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    assert not FastPixels.accepts([Image.new("RGB", (4, 4)), rgba])
    with pytest.raises(ValueError, match="RGB"):
        FastPixels.for_processor(processor)([rgba])
    for change in ({"do_center_crop": True}, {"do_normalize": False}, {"size": {"shortest_edge": 96}}):
        other = copy.deepcopy(processor)
        for key, value in change.items():
            setattr(other, key, value)
        assert FastPixels.for_processor(other) is None, change


def test_engines_use_it_and_still_match_on_rgba(processor):
    from reefcap.models.engines.loader import load_engine

    engine = load_engine(str(zoo_models()["reefscenes-tiny-damf"]), backend="onnx")
    assert engine.fast_pixels is not None
    images = [*_odd_images(), Image.new("RGBA", (30, 40), (10, 200, 30, 128))]
    want = processor(images=images, return_tensors="np")["pixel_values"]  # alpha composited on white
    assert np.array_equal(engine.preprocess(images), want)
