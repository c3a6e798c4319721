"""UIQM / UCIQE on images whose scores follow from the formulas by hand, and on the real EUVP pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from reefcap.models import quality
from reefcap.models.errors import ImageError


def solid(rgb, size=40):
    return np.full((size, size, 3), rgb, dtype=np.uint8)


def test_flat_gray_scores_zero_on_every_term():
    t = quality.measure(solid((128, 128, 128)))
    for key in ("uicm", "uism", "uiconm", "uiqm", "con_l"):
        assert t[key] == pytest.approx(0.0, abs=1e-9), key
    assert t["uciqe"] == pytest.approx(0.0, abs=1e-4)  # a*, b* of sRGB gray are 0 up to rounding
    assert t["r_g"] == pytest.approx(1.0) and t["b_g"] == pytest.approx(1.0)


def test_solid_red_matches_the_formulas_by_hand():
    t = quality.measure(solid((255, 0, 0)))
    # RG = 255 and YB = 127.5 everywhere: no variance, only the mean term of UICM.
    assert t["uicm"] == pytest.approx(-0.0268 * math.hypot(255, 127.5))
    assert t["uiqm"] == pytest.approx(0.0282 * t["uicm"])
    # sRGB red in CIELab (D65) is L* 53.24, a* 80.09, b* 67.20.
    chroma, light = math.hypot(80.09, 67.20), 53.24
    assert t["sigma_c"] == pytest.approx(0.0, abs=1e-9)
    assert t["mu_s"] == pytest.approx(chroma / math.hypot(chroma, light), abs=1e-3)
    assert t["uciqe"] == pytest.approx(0.2576 * t["mu_s"])


@pytest.mark.parametrize(
    "rgb, lab",
    [((255, 255, 255), (100, 0, 0)), ((255, 0, 0), (53.24, 80.09, 67.20)), ((0, 0, 255), (32.30, 79.19, -107.86))],
)
def test_lab_conversion_matches_reference_values(rgb, lab):
    got = quality.rgb_to_lab(np.array([[rgb]], dtype=np.float64))[0, 0]
    assert got == pytest.approx(lab, abs=0.02)


def test_black_and_white_halves_have_full_luminance_contrast():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255
    t = quality.uciqe_terms(img)
    assert t["con_l"] == pytest.approx(1.0)
    assert t["uciqe"] == pytest.approx(0.2745, abs=1e-4)


def test_uiconm_of_a_fine_checkerboard_is_minus_r_log_r():
    yy, xx = np.mgrid[:40, :40]
    img = np.where(((yy + xx) % 2 == 0)[..., None], 192, 64).astype(np.uint8).repeat(3, axis=2)
    # Every 10x10 block has max 192, min 64: r = 128 / 256 = 0.5.
    assert quality.uiqm_terms(img)["uiconm"] == pytest.approx(-0.5 * math.log(0.5))


def test_eme_and_trimmed_mean_follow_their_definitions():
    block = np.ones((20, 20))
    block[::2, ::2] = 4.0  # every 10x10 block: max 4, min 1
    assert quality._eme(block[None])[0] == pytest.approx(2.0 * math.log(4.0))
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1000], dtype=float)
    assert quality._trimmed_mean(values) == pytest.approx(5.5)  # 1 and 1000 trimmed


def test_blur_lowers_sharpness_and_noise_raises_colourfulness():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(3)))
    assert quality.uiqm_terms(blurred)["uism"] < quality.uiqm_terms(img)["uism"]
    assert quality.uiqm_terms(img)["uicm"] > quality.uiqm_terms(blurred)["uicm"]


def test_pil_input_and_gray_input_are_accepted():
    img = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert quality.uiqm(Image.fromarray(img)) == pytest.approx(quality.uiqm(img))
    assert quality.uciqe(Image.fromarray(img)) == pytest.approx(quality.uciqe(img))
    gray = img[..., 0]
    assert quality.uiqm(gray) == pytest.approx(quality.uiqm(np.stack([gray] * 3, axis=2)))


@pytest.mark.parametrize(
    "bad", [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 4), np.uint8), np.zeros((1, 5, 3), np.uint8)]
)
def test_bad_input_is_a_typed_error(bad):
    with pytest.raises(ImageError):
        quality.uiqm(bad)


def test_enhanced_euvp_photos_score_above_raw_on_average(euvp_images):
    raw = [np.asarray(Image.open(p).convert("RGB")) for p in euvp_images]
    enhanced = [np.asarray(Image.open(p.parent.parent / "enhanced" / p.name).convert("RGB")) for p in euvp_images]
    for fn in (quality.uiqm, quality.uciqe):
        assert np.mean([fn(x) for x in enhanced]) > np.mean([fn(x) for x in raw]), fn.__name__


def test_histogram_trimmed_mean_equals_the_sorted_definition():
    rng = np.random.default_rng(3)
    for k in (1, 5, 10, 11, 999, 4096):
        codes = rng.integers(0, 1021, k)
        values = (codes - 510) / 2.0
        mu, var = quality._histogram_stats(codes, 1021, 510, 2.0)
        assert mu == pytest.approx(quality._trimmed_mean(values), abs=1e-9), k
        assert var == pytest.approx(float(np.mean((values - mu) ** 2)), rel=1e-9), k
