"""No-reference underwater image quality: UIQM and UCIQE in plain numpy (no torch, no scipy).

Both measures have many implementations that disagree in their details, so the conventions used here are
stated exactly. Scores are comparable between images measured with this module, not with numbers published
from other code.

UIQM (Panetta, Gao & Agaian, "Human-Visual-System-Inspired Underwater Image Quality Measures",
IEEE J. Oceanic Eng. 41(3), 2016)::

    UIQM = 0.0282 * UICM + 0.2953 * UISM + 3.5753 * UIConM

- Pixel values are used on the 0..255 scale (floats).
- UICM (colourfulness): opponent channels RG = R - G and YB = (R + G) / 2 - B over all pixels;
  asymmetric alpha-trimmed mean with alpha_L = alpha_R = 0.1 (the ceil(0.1 K) smallest and floor(0.1 K)
  largest values dropped); variance = mean squared deviation of *all* values from that trimmed mean.
  UICM = -0.0268 * sqrt(mu_RG^2 + mu_YB^2) + 0.1586 * sqrt(var_RG + var_YB).
- UISM (sharpness): per channel, the Sobel gradient magnitude (3x3 kernels, edge-replicated borders)
  multiplied by the channel itself ("grayscale edge map"); EME over non-overlapping 10x10 pixel blocks
  (rows/columns that do not fill a block are dropped): EME = 2 / (k1 k2) * sum ln(max / min), where a block
  whose minimum is 0 contributes 0 (the ratio is undefined). UISM = 0.299 EME_R + 0.587 EME_G + 0.114 EME_B.
- UIConM (contrast): logAMEE over the same 10x10 blocks of the intensity image I = (R + G + B) / 3, with
  ordinary arithmetic in place of the paper's PLIP operators (as the widely used implementations do):
  UIConM = -1 / (k1 k2) * sum r * ln(r), r = (max - min) / (max + min); a block with r = 0 contributes 0.
  The leading minus makes the term non-negative (r ln r <= 0 for r in (0, 1]).

UCIQE (Yang & Sowmya, "An Underwater Color Image Quality Evaluation Metric", IEEE Trans. Image Process.
24(12), 2015)::

    UCIQE = 0.4680 * sigma_c + 0.2745 * con_l + 0.2576 * mu_s

computed in CIELab (sRGB, D65 white, the standard sRGB transfer curve), every term normalised to about 0..1:

- sigma_c: standard deviation of the chroma C* = sqrt(a*^2 + b*^2) over all pixels, divided by 100;
- con_l: mean L* of the brightest 1 % of pixels minus mean L* of the darkest 1 % (at least one pixel
  each), divided by 100;
- mu_s: mean saturation, s = C* / sqrt(C*^2 + L*^2) (bounded in 0..1; 0 for black pixels).

For scale: on the 23 real EUVP test photos at 256 px these give UIQM 2.73 (raw) vs 2.92 (enhanced) and
UCIQE 0.399 vs 0.416 on average (docs/reefscenes-report.md). Both depend on resolution (block counts,
edge strength), so compare images at the same size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reefcap.models.errors import ImageError

UIQM_WEIGHTS = (0.0282, 0.2953, 3.5753)  # Panetta et al. 2016, eq. 13
UCIQE_WEIGHTS = (0.4680, 0.2745, 0.2576)  # Yang & Sowmya 2015
BLOCK = 10  # EME / logAMEE block size in pixels
TRIM = 0.1  # alpha_L = alpha_R for the UICM trimmed mean
LUMA = (0.299, 0.587, 0.114)  # UISM channel weights (Panetta et al. 2016, after the NTSC luma)

__all__ = [
    "uiqm",
    "uciqe",
    "uiqm_terms",
    "uciqe_terms",
    "channel_ratios",
    "measure",
    "to_rgb_array",
    "rgb_to_lab",
    "srgb_to_linear",
    "QUALITY_SIDE",
    "quality_copy",
    "input_quality",
]


def _rgb_uint8(image: Any) -> np.ndarray:
    """Validate and return an HxWx3 uint8 array from a uint8 RGB array, a 2-D gray array or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image, without importing PIL here
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ImageError(f"expected a uint8 RGB array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"expected an HxWx3 RGB array, got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageError(f"image too small to measure: {arr.shape[1]}x{arr.shape[0]}")
    return arr


def to_rgb_array(image: Any) -> np.ndarray:
    """An HxWx3 float64 array on the 0..255 scale from a uint8 RGB array, a 2-D gray array or a PIL image."""
    return _rgb_uint8(image).astype(np.float64)


# The measures run on every image the server captions, so the per-pixel work is float32 (several times faster
# than float64 here for the same result to ~1e-6) and every mean accumulates in float64.

# --- UIQM -----------------------------------------------------------------------------------------------


def _trimmed_mean(values: np.ndarray, alpha: float = TRIM) -> float:
    """Mean without the ceil(alpha K) smallest and floor(alpha K) largest of K values."""
    k = values.size
    lo, hi = math.ceil(alpha * k), math.floor(alpha * k)
    if lo + hi >= k:  # too few values to trim: fall back to the plain mean
        return float(values.mean(dtype=np.float64))
    # A partition at both cut points leaves exactly the kept values between them (in some order): the same
    # mean as sorting, in linear time.
    ordered = np.partition(values, (lo, k - hi - 1))
    return float(ordered[lo : k - hi].mean(dtype=np.float64))


def _histogram_stats(
    codes: np.ndarray, bins: int, offset: int, scale: float, alpha: float = TRIM
) -> tuple[float, float]:
    """Trimmed mean (as ``_trimmed_mean``) and the mean squared deviation of all values from it, for values
    ``(code - offset) / scale`` given as non-negative integer codes: exact, from one histogram."""
    counts = np.bincount(codes, minlength=bins)
    values = (np.arange(bins, dtype=np.float64) - offset) / scale
    k = codes.size
    lo, hi = math.ceil(alpha * k), math.floor(alpha * k)
    if lo + hi >= k:
        mu = float(counts @ values / k)
    else:
        keep = np.clip(np.cumsum(counts) - lo, 0, counts)  # drop the lo smallest...
        keep = np.clip(np.cumsum(keep[::-1])[::-1] - hi, 0, keep)  # ...then the hi largest
        mu = float(keep @ values / (k - lo - hi))
    return mu, float(counts @ np.square(values - mu) / k)


def _uicm(rgb: np.ndarray) -> float:
    """UICM of an HxWx3 uint8 array. RG = R - G and 2 YB = R + G - 2 B are integers: histograms give the
    trimmed means and variances exactly, without sorting."""
    r, g, b = (rgb[..., c].ravel().astype(np.int32) for c in range(3))
    mu_rg, var_rg = _histogram_stats(r - g + 255, 511, 255, 1.0)
    mu_yb, var_yb = _histogram_stats(r + g - 2 * b + 510, 1021, 510, 2.0)
    return -0.0268 * math.hypot(mu_rg, mu_yb) + 0.1586 * math.sqrt(var_rg + var_yb)


def _sobel_magnitude(rgb: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of every channel of an HxWx3 uint8 array, as a 3xHxW float32 array
    (edge-replicated borders; the gradients are integers, computed exactly in int16)."""
    p = np.pad(rgb.transpose(2, 0, 1).astype(np.int16), ((0, 0), (1, 1), (1, 1)), mode="edge")
    # Separable Sobel: smoothing [1, 2, 1] across, difference [-1, 0, 1] along.
    rows = p[:, :-2] + p[:, 2:]
    rows += p[:, 1:-1]
    rows += p[:, 1:-1]
    cols = p[:, :, :-2] + p[:, :, 2:]
    cols += p[:, :, 1:-1]
    cols += p[:, :, 1:-1]
    gx = (rows[:, :, 2:] - rows[:, :, :-2]).astype(np.float32)
    gy = (cols[:, 2:] - cols[:, :-2]).astype(np.float32)
    gx *= gx
    gy *= gy
    gx += gy
    return np.sqrt(gx, out=gx)


def _blocks(planes: np.ndarray, size: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per-block max and min over non-overlapping size x size blocks (partial blocks dropped) of each plane
    of a CxHxW array: two (C, blocks) arrays."""
    c, h, w = planes.shape
    k2, k1 = h // size, w // size
    if k1 == 0 or k2 == 0:  # smaller than one block: the whole image is the only block
        flat = planes.reshape(c, -1)
        return flat.max(axis=1, keepdims=True), flat.min(axis=1, keepdims=True)
    # Reduce over each block's rows first (whole contiguous image rows at a time), then within the row.
    strips = planes[:, : k2 * size, : k1 * size].reshape(c, k2, size, k1 * size)
    bmax = strips.max(axis=2).reshape(c, k2, k1, size).max(axis=3)
    bmin = strips.min(axis=2).reshape(c, k2, k1, size).min(axis=3)
    return bmax.reshape(c, -1), bmin.reshape(c, -1)


def _eme(planes: np.ndarray) -> np.ndarray:
    """EME of each plane of a CxHxW array."""
    bmax, bmin = _blocks(planes)
    ok = bmin > 0  # a block whose minimum is 0 contributes 0 (log 1)
    ratio = np.divide(bmax, bmin, out=np.ones_like(bmax), where=ok)
    return 2.0 / bmax.shape[1] * np.log(ratio).sum(axis=1, dtype=np.float64)


def _uism(rgb: np.ndarray, planes: np.ndarray) -> float:
    eme = _eme(_sobel_magnitude(rgb) * planes)
    return float(sum(w * eme[c] for c, w in enumerate(LUMA)))


def _uiconm(planes: np.ndarray) -> float:
    bmax, bmin = _blocks(planes.mean(axis=0, keepdims=True))
    bmax, bmin = bmax[0].astype(np.float64), bmin[0].astype(np.float64)
    top, bot = bmax - bmin, bmax + bmin
    ok = (top > 0) & (bot > 0)
    ratio = top[ok] / bot[ok]
    return float(-1.0 / bmax.size * np.sum(ratio * np.log(ratio)))


def uiqm_terms(image: Any) -> dict[str, float]:
    """UICM, UISM, UIConM and their weighted sum UIQM (conventions in the module docstring)."""
    rgb = _rgb_uint8(image)
    planes = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    terms = {"uicm": _uicm(rgb), "uism": _uism(rgb, planes), "uiconm": _uiconm(planes)}
    terms["uiqm"] = float(sum(w * terms[k] for w, k in zip(UIQM_WEIGHTS, ("uicm", "uism", "uiconm"), strict=True)))
    return terms


def uiqm(image: Any) -> float:
    """Underwater Image Quality Measure (Panetta et al. 2016) of an HxWx3 uint8 RGB array or PIL image."""
    return uiqm_terms(image)["uiqm"]


# --- UCIQE ----------------------------------------------------------------------------------------------

_SRGB_TO_XYZ = np.array(  # IEC 61966-2-1, D65
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer curve inverted (IEC 61966-2-1): values in 0..1 to linear light in 0..1."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


# The transfer curve of every 8-bit value: indexing it replaces a power per pixel.
_LINEAR_LUT = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)


def _lab_planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L*, a*, b* (flat float32) of an HxWx3 sRGB array on the 0..255 scale (uint8 takes a lookup table)."""
    linear = _LINEAR_LUT[rgb] if rgb.dtype == np.uint8 else srgb_to_linear(np.asarray(rgb, np.float32) / 255)
    xyz = linear.reshape(-1, 3) @ (_SRGB_TO_XYZ.T / _D65_WHITE).astype(np.float32)
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.cbrt(xyz)
    dark = xyz <= eps  # the linear segment near black, for the few pixels that need it
    if dark.any():
        f[dark] = (kappa * xyz[dark] + 16) / 116
    return 116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELab (L* 0..100) of an HxWx3 sRGB array on the 0..255 scale."""
    rgb = np.asarray(rgb)
    return np.stack(_lab_planes(rgb), axis=-1).reshape(rgb.shape)


def uciqe_terms(image: Any) -> dict[str, float]:
    """sigma_c, con_l, mu_s and their weighted sum UCIQE (conventions in the module docstring)."""
    lum, a, b = _lab_planes(_rgb_uint8(image))
    chroma = np.sqrt(a * a + b * b)
    n = max(1, round(0.01 * lum.size))
    part = np.partition(lum, (n - 1, lum.size - n))
    con_l = (part[lum.size - n :].mean(dtype=np.float64) - part[:n].mean(dtype=np.float64)) / 100.0
    denom = np.sqrt(chroma * chroma + lum * lum)
    sat = np.divide(chroma, denom, out=np.zeros_like(chroma), where=denom > 0)
    sigma_c = float(chroma.std(dtype=np.float64) / 100.0)
    terms = {"sigma_c": sigma_c, "con_l": float(con_l), "mu_s": float(sat.mean(dtype=np.float64))}
    weights = zip(UCIQE_WEIGHTS, ("sigma_c", "con_l", "mu_s"), strict=True)
    terms["uciqe"] = float(sum(w * terms[k] for w, k in weights))
    return terms


def uciqe(image: Any) -> float:
    """Underwater Colour Image Quality Evaluation (Yang & Sowmya 2015) of an HxWx3 uint8 RGB array or PIL image."""
    return uciqe_terms(image)["uciqe"]


# --- colour cast ----------------------------------------------------------------------------------------


def channel_ratios(image: Any) -> dict[str, float]:
    """Channel-mean ratios R/G and B/G: the colour cast that water attenuation leaves (red lost first)."""
    rgb = to_rgb_array(image)
    r, g, b = (float(rgb[..., c].mean()) for c in range(3))
    g = max(g, 1e-6)
    return {"r_g": r / g, "b_g": b / g}


def measure(image: Any) -> dict[str, float]:
    """Every measure of this module at once: UIQM and UCIQE (with their terms) and the channel ratios."""
    return {**uiqm_terms(image), **uciqe_terms(image), **channel_ratios(image)}


# --- per input, as served ---------------------------------------------------------------------------------

# Inputs are measured on a copy reduced by a whole factor (box filter) to at most this many pixels a side:
# bounded cost (about 1 ms on this project's 2-core CI machine) whatever the image, and the same numbers from
# the server (``quality`` in /v1/captions) and from ``reefcap caption --quality``.
QUALITY_SIDE = 128


def quality_copy(image: Any) -> Any:
    """The PIL image reduced by the smallest whole factor that brings both sides to QUALITY_SIDE or less."""
    factor = math.ceil(max(image.size) / QUALITY_SIDE)
    return image.reduce(factor) if factor > 1 else image


def input_quality(image: Any) -> dict[str, float | None]:
    """``{"uiqm", "uciqe"}`` of a decoded RGB PIL image, rounded to 4 places, as the server reports them.

    A measure is None for an image it cannot measure (1x1, or 10x2000 once reduced): quality is extra
    information, so such an image is still captioned, never refused.
    """
    small = np.asarray(quality_copy(image))  # one uint8 array for both measures
    return {"uiqm": _measured(uiqm, small), "uciqe": _measured(uciqe, small)}


def _measured(measure: Any, pixels: np.ndarray) -> float | None:
    try:
        return round(measure(pixels), 4)
    except ImageError:
        return None
