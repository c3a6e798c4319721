"""Training and serving see the same pixels: a dataset image reaches the trainer's batch exactly as an upload
of the same file reaches the engine (one decoder, `reefcap.models.data.images.load_image`, for both)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reefcap.models.data.images import load_image
from reefcap.models.engines.base import EngineConfig
from reefcap.models.errors import UnsupportedImageFormatError
from reefcap.training.config import AugmentConfig

pytestmark = pytest.mark.timeout(240)


def _scene(w: int = 48, h: int = 32) -> np.ndarray:
    """An asymmetric picture (gradients plus a corner patch): any rotation or flip of it changes the pixels."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=-1).astype(np.uint8)
    img[:8, :12] = (250, 30, 30)
    return img


def _exif_rotated_jpeg(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise for display
    Image.fromarray(_scene()).save(path, quality=95, exif=exif)
    return path


def _rgba_png(path: Path) -> Path:
    rgba = np.dstack([_scene(), np.full(_scene().shape[:2], 255, np.uint8)])
    rgba[:, :20, 3] = 0  # a transparent band: composited on white by the server, black under a bare convert
    rgba[:, 20:30, 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("skew")
    return {"exif_jpeg": _exif_rotated_jpeg(root / "rotated.jpg"), "rgba_png": _rgba_png(root / "alpha.png")}


@pytest.fixture(scope="module", params=["torch", "onnx"])
def engine(request, tiny_model, tmp_path_factory):
    if request.param == "torch":
        from reefcap.models.engines.torch_engine import TorchCaptionEngine

        return TorchCaptionEngine.load(str(tiny_model), EngineConfig(device="cpu"))
    from reefcap.models.engines.onnx_engine import OnnxCaptionEngine
    from reefcap.models.export.onnx import export_onnx

    exported = export_onnx(str(tiny_model), tmp_path_factory.mktemp("onnx") / "fp32")
    return OnnxCaptionEngine.load(str(exported), EngineConfig(device="cpu", threads=1))


def _trainer_pixels(model: Path, image: Path, tmp_path: Path) -> np.ndarray:
    """What `reefcap train` feeds the model for a one-image dataset, augmentations off (as `Trainer` builds it)."""
    from reefcap.models.engines.torch_engine import load_blip
    from reefcap.models.registry import resolve_model
    from reefcap.training.augment import TrainTransform
    from reefcap.training.data import CaptionBatches, load_records

    coco = tmp_path / "captions.json"
    doc = {"images": [{"id": 1, "file_name": str(image)}], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}
    coco.write_text(json.dumps(doc))
    _, processor = load_blip(resolve_model(str(model)))
    size = processor.image_processor.size["height"]
    transform = TrainTransform(size, AugmentConfig(enabled=False), underwater=None)
    batches = CaptionBatches(load_records(coco), processor, transform, batch_size=1, seed=0)
    return batches.batch(0, 0)["pixel_values"].numpy()


@pytest.mark.parametrize("kind", ["exif_jpeg", "rgba_png"])
def test_trainer_sees_the_pixels_the_engine_sees(kind, images, engine, tiny_model, tmp_path):
    served = np.asarray(engine.preprocess([load_image(images[kind])]), dtype=np.float32)
    trained = _trainer_pixels(tiny_model, images[kind], tmp_path)
    assert trained.shape == served.shape
    np.testing.assert_array_equal(trained, served)


def test_the_inputs_are_ones_a_bare_convert_gets_wrong(images):
    # Guards the test above: were these files decoded the same either way, it would prove nothing.
    for path in images.values():
        with Image.open(path) as f:
            bare = np.asarray(f.convert("RGB"))
        assert not np.array_equal(bare, np.asarray(load_image(path)))


def test_underwater_copies_of_a_dataset_are_rendered_upright(images, tmp_path):
    """`reefcap data underwater` wets the photo as training will read it: the EXIF-rotated one turned upright."""
    from reefcap.models.data.records import CaptionRecord
    from reefcap.models.reefscenes.dataset import wet_dataset

    record = CaptionRecord(1, images["exif_jpeg"], ("a gradient",))
    wet_dataset([record], tmp_path / "wet", workers=1, progress=False)
    with Image.open(next((tmp_path / "wet" / "images").glob("*.jpg"))) as wet:
        assert wet.size == load_image(images["exif_jpeg"]).size == (32, 48)


def test_plain_rgb_jpeg_decodes_bit_exactly_as_before(tmp_path, euvp_images):
    """Existing datasets train on the same pixels as before the switch to the shared decoder."""
    from reefcap.models.data.images import load_dataset_image

    for path in euvp_images[:3]:
        with Image.open(path) as f:
            assert np.array_equal(np.asarray(load_dataset_image(path)), np.asarray(f.convert("RGB")))


def test_training_keeps_reading_formats_the_server_refuses(tmp_path):
    """The server's upload limits are not a dataset's: a PPM trained before and must still load."""
    from reefcap.models.data.images import load_dataset_image

    path = tmp_path / "frame.ppm"
    Image.fromarray(_scene()).save(path)
    with pytest.raises(UnsupportedImageFormatError):
        load_image(path)
    assert np.array_equal(np.asarray(load_dataset_image(path)), _scene())
