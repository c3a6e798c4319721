"""Image decoding: every accepted mode becomes upright 8-bit RGB; every bad input gets its typed error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from reefcap.models.data.images import ImageLimits, load_image
from reefcap.models.errors import (
    ImageNotFoundError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageFormatError,
)


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_real_jpeg_decodes_to_rgb(euvp_images):
    image = load_image(euvp_images[0])
    assert image.mode == "RGB" and image.size == (256, 256)


def test_exif_orientation_is_applied():
    # 40x20 stored, EXIF orientation 6 (rotate 90 CW): upright it is 20 wide, 40 tall.
    raw = Image.new("RGB", (40, 20), (200, 10, 10))
    raw.paste((10, 10, 200), (0, 0, 10, 20))  # blue strip on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(encode(raw, "JPEG", exif=exif, quality=95))
    assert image.size == (20, 40)
    top = np.asarray(image)[:5].mean(axis=(0, 1))
    assert top[2] > 150 and top[0] < 100, "stored left edge should end up on top after a 90-degree CW turn"


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 0), (255, 255, 255)),  # fully transparent: composited over white
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_modes_convert_to_rgb(mode, color, expected):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = load_image(encode(Image.new(mode, (8, 8), color), fmt))
    assert image.mode == "RGB"
    assert np.allclose(np.asarray(image)[4, 4], expected, atol=2)


def test_palette_with_transparency():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    pal.paste(1, (0, 0, 4, 8))
    pal.info["transparency"] = 0  # index 0 (blue) transparent
    image = load_image(encode(pal, "PNG", transparency=0))
    px = np.asarray(image)
    assert tuple(px[4, 1]) == (0, 255, 0)
    assert tuple(px[4, 6]) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[0, 0] = 65535
    image = load_image(encode(Image.fromarray(arr)))
    px = np.asarray(image)
    assert image.mode == "RGB"
    assert abs(int(px[4, 4, 0]) - 128) <= 1, "mid-range 16-bit grey must map to mid grey, not white"
    assert tuple(px[0, 0]) == (255, 255, 255)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture of anything")
    with pytest.raises(NotAnImageError, match="not a recognised image format"):
        load_image(path)


def test_empty_and_missing_inputs(tmp_path):
    with pytest.raises(NotAnImageError, match="empty"):
        load_image(b"")
    with pytest.raises(NotAnImageError, match="directory") as info:
        load_image(tmp_path)
    assert info.value.code == "not_an_image"


def test_missing_path_is_not_found_not_not_an_image(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such file") as info:
        load_image(tmp_path / "absent.png")
    assert info.value.code == "not_found"
    assert isinstance(info.value, NotAnImageError)  # code written before it had its own type still catches it


def test_truncated_jpeg(euvp_images):
    data = euvp_images[0].read_bytes()
    with pytest.raises(TruncatedImageError):
        load_image(data[: len(data) // 2])


def test_oversized_bytes():
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageTooLargeError, match="bytes"):
        load_image(data, ImageLimits(max_bytes=len(data) - 1))


def test_decompression_bomb_is_refused_before_decoding():
    # A 12000x12000 single-colour PNG is a few hundred KB on disk but 144 MP decoded.
    data = encode(Image.new("L", (12000, 12000)), "PNG")
    assert len(data) < 1_000_000
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load_image(data)


def test_format_allow_list():
    data = encode(Image.new("RGB", (8, 8)), "PPM")
    with pytest.raises(UnsupportedImageFormatError, match="PPM"):
        load_image(data)
    assert load_image(data, ImageLimits(formats=("PPM",))).size == (8, 8)


def test_every_image_error_has_a_distinct_code():
    classes = (
        NotAnImageError,
        ImageNotFoundError,
        TruncatedImageError,
        ImageTooLargeError,
        UnsupportedImageFormatError,
    )
    assert len({cls.code for cls in classes}) == len(classes)
