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
  (rows/columns that do not fill a block are dropped): EME = 2 / (k1 k2) * sum log(max / min), where a block
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

__all__ = ["uiqm", "uciqe", "uiqm_terms", "uciqe_terms", "channel_ratios", "measure", "to_rgb_array"]


def to_rgb_array(image: Any) -> np.ndarray:
    """An HxWx3 float64 array on the 0..255 scale from a uint8 RGB array, a 2-D gray array or a PIL image."""
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
    return arr.astype(np.float64)


# --- UIQM -----------------------------------------------------------------------------------------------


def _trimmed_mean(values: np.ndarray, alpha: float = TRIM) -> float:
    k = values.size
    lo, hi = math.ceil(alpha * k), math.floor(alpha * k)
    if lo + hi >= k:  # too few values to trim: fall back to the plain mean
        return float(values.mean())
    ordered = np.sort(values, axis=None)
    return float(ordered[lo : k - hi].mean())


def _uicm(rgb: np.ndarray) -> float:
    r, g, b = rgb[..., 0].ravel(), rgb[..., 1].ravel(), rgb[..., 2].ravel()
    rg, yb = r - g, (r + g) / 2.0 - b
    mu_rg, mu_yb = _trimmed_mean(rg), _trimmed_mean(yb)
    var_rg, var_yb = float(np.mean((rg - mu_rg) ** 2)), float(np.mean((yb - mu_yb) ** 2))
    return -0.0268 * math.hypot(mu_rg, mu_yb) + 0.1586 * math.sqrt(var_rg + var_yb)


def _sobel_magnitude(channel: np.ndarray) -> np.ndarray:
    p = np.pad(channel, 1, mode="edge")
    # Separable Sobel: smoothing [1, 2, 1] across, difference [-1, 0, 1] along.
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.hypot(gx, gy)


def _blocks(channel: np.ndarray, size: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per-block max and min over non-overlapping size x size blocks (partial blocks dropped)."""
    k2, k1 = channel.shape[0] // size, channel.shape[1] // size
    if k1 == 0 or k2 == 0:  # smaller than one block: the whole image is the only block
        return np.array([channel.max()]), np.array([channel.min()])
    tiles = channel[: k2 * size, : k1 * size].reshape(k2, size, k1, size)
    return tiles.max(axis=(1, 3)).ravel(), tiles.min(axis=(1, 3)).ravel()


def _eme(channel: np.ndarray) -> float:
    bmax, bmin = _blocks(channel)
    ok = bmin > 0
    return float(2.0 / bmax.size * np.sum(np.log(bmax[ok] / bmin[ok])))


def _uism(rgb: np.ndarray) -> float:
    return sum(w * _eme(_sobel_magnitude(rgb[..., c]) * rgb[..., c]) for c, w in enumerate(LUMA))


def _uiconm(rgb: np.ndarray) -> float:
    bmax, bmin = _blocks(rgb.mean(axis=2))
    top, bot = bmax - bmin, bmax + bmin
    ok = (top > 0) & (bot > 0)
    ratio = top[ok] / bot[ok]
    return float(-1.0 / bmax.size * np.sum(ratio * np.log(ratio)))


def uiqm_terms(image: Any) -> dict[str, float]:
    """UICM, UISM, UIConM and their weighted sum UIQM (conventions in the module docstring)."""
    rgb = to_rgb_array(image)
    terms = {"uicm": _uicm(rgb), "uism": _uism(rgb), "uiconm": _uiconm(rgb)}
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


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELab (L* 0..100) of an HxWx3 sRGB array on the 0..255 scale."""
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    lab = np.empty_like(f)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def uciqe_terms(image: Any) -> dict[str, float]:
    """sigma_c, con_l, mu_s and their weighted sum UCIQE (conventions in the module docstring)."""
    lab = rgb_to_lab(to_rgb_array(image))
    lum = lab[..., 0].ravel()
    chroma = np.hypot(lab[..., 1], lab[..., 2]).ravel()
    n = max(1, round(0.01 * lum.size))
    part = np.partition(lum, (n - 1, lum.size - n))
    con_l = (part[lum.size - n :].mean() - part[:n].mean()) / 100.0
    denom = np.hypot(chroma, lum)
    sat = np.divide(chroma, denom, out=np.zeros_like(chroma), where=denom > 0)
    terms = {"sigma_c": float(chroma.std() / 100.0), "con_l": float(con_l), "mu_s": float(sat.mean())}
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
