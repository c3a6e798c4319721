"""Underwater image formation: turn an in-air image (plus a range map) into what a camera sees underwater.

The model combines these sources:

- per-channel attenuation from the Jerlov (1976) water types, as the per-metre residual energy N_c used by the
  UWCNN synthesis (Li, Anwar & Porikli 2020): transmission ``t_c = N_c ** z`` over range ``z``;
- the revised formation model (Akkaynak & Treibitz 2018/2019), with a direct signal and a backscatter term
  that saturates to the veiling light ``B_inf`` at long range:
  ``I_c = E_c J_c exp(-b_D,c z) + B_inf,c (1 - exp(-b_B,c z))``, where the ambient light ``E_c = N_c ** D``
  has itself come down through ``D`` metres of water (as UWCNN's ``A_c = 1.5 N_c ** D``);
- forward scatter: part of the direct signal arrives blurred, with a Gaussian whose width grows with range;
- turbidity that varies smoothly over the image, marine snow (bright particles near the camera), an
  artificial light with inverse-square falloff and vignetting, sensor shot/read noise after auto exposure,
  and JPEG compression.

All sampled parameters are returned so they can be stored with each image.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from reefcap.models.quality import srgb_to_linear

# Per-metre residual energy N_c (R, G, B) by Jerlov water type; Jerlov 1976 as tabulated for UWCNN
# (Li, Anwar & Porikli 2020). I-III are open ocean (blue), 1C-9C coastal (green, turbid).
JERLOV_N: dict[str, tuple[float, float, float]] = {
    "I": (0.85, 0.961, 0.982),
    "IA": (0.84, 0.955, 0.975),
    "IB": (0.83, 0.95, 0.968),
    "II": (0.80, 0.925, 0.94),
    "III": (0.75, 0.885, 0.89),
    "1C": (0.75, 0.885, 0.875),
    "3C": (0.71, 0.82, 0.80),
    "5C": (0.67, 0.73, 0.67),
    "7C": (0.62, 0.61, 0.50),
    "9C": (0.55, 0.46, 0.29),
}
WATER_TYPES = tuple(JERLOV_N)
FAR_RANGE_M = 60.0  # "open water" beyond the scene: only veiling light is left at this range


@dataclass
class WaterParams:
    """Everything sampled for one rendering; stored in the dataset metadata."""

    water_type: str = "II"
    range_m: float = 3.0  # camera-to-subject range in metres (with a depth map: the map's median, for the record)
    light_depth_m: float = 5.0  # how far daylight came down before reaching the scene
    turbidity: float = 1.0  # scales the attenuation coefficients (1 = the Jerlov table)
    turbidity_variation: float = 0.25  # relative amplitude of the smooth spatial variation
    backscatter: float = 0.35  # scales the veiling light
    forward_scatter: float = 0.35  # fraction of the direct signal that arrives blurred at long range
    artificial_light: float = 0.0  # strength of a camera-mounted light (0 = none)
    marine_snow: float = 0.0  # particles per 10,000 pixels
    vignetting: float = 0.3
    exposure: float = 0.45  # auto exposure: mean linear luminance the camera aims for
    white_balance: float = 0.2  # 0 = camera keeps the water's cast, 1 = fully grey-world corrected
    contrast: float = 0.3  # the camera's S-shaped tone curve (0 = plain sRGB)
    noise: float = 0.01  # read-noise standard deviation in linear units at unit gain
    jpeg_quality: int | None = 90

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def sample_params(rng: np.random.Generator, water_type: str | None = None) -> WaterParams:
    """Random conditions spread over the real range: clear ocean to murky coastal water, near to far.

    Ranges are drawn so that enough light survives: the subject returns at least a quarter of its green
    light (``N_G ** z >= 0.25``, beyond that its captions would describe something invisible), and daylight
    keeps at least 5 % of its green on the way down (photos are taken where there is light to take them).
    Water types are weighted towards the reef waters most photos come from (oceanic and clearer coastal);
    a given ``water_type`` is kept and the ranges are drawn for it.
    """
    water = str(rng.choice(WATER_TYPES, p=[0.12, 0.12, 0.12, 0.15, 0.12, 0.12, 0.1, 0.08, 0.05, 0.02]))
    water = water_type or water  # drawn anyway, so a fixed type leaves the other draws unchanged
    turbidity = float(rng.uniform(0.7, 1.4))
    n_g = JERLOV_N[water][1] ** turbidity
    max_range = min(3.5, math.log(0.25) / math.log(n_g))
    max_light = min(20.0, math.log(0.05) / math.log(n_g))
    return WaterParams(
        water_type=water,
        range_m=float(rng.uniform(0.5, max(0.7, max_range))),
        light_depth_m=float(rng.uniform(max(2.0, 0.3 * max_light), max_light)),
        turbidity=turbidity,
        turbidity_variation=float(rng.uniform(0.0, 0.4)),
        backscatter=float(rng.uniform(0.2, 0.5)),
        forward_scatter=float(rng.uniform(0.15, 0.6)),
        artificial_light=float(rng.uniform(0.3, 1.2)) if rng.random() < 0.25 else 0.0,
        marine_snow=float(rng.uniform(1.0, 12.0)) if rng.random() < 0.4 else 0.0,
        vignetting=float(rng.uniform(0.1, 0.6)),
        exposure=float(rng.uniform(0.2, 0.4)),
        white_balance=float(rng.uniform(0.0, 0.2)),
        contrast=float(rng.uniform(0.2, 1.0)),
        noise=float(rng.uniform(0.003, 0.015)),
        jpeg_quality=int(rng.integers(70, 96)),
    )


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def default_range_map(height: int, width: int, range_m: float) -> np.ndarray:
    """A plausible range map for a photo without one: the subject range at the bottom, growing to 2.5x at the top
    (camera looking forward over the bottom, far things high in the frame)."""
    rows = np.linspace(2.5, 1.0, height)[:, None]
    return np.broadcast_to(rows * range_m, (height, width)).astype(np.float64)


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int = 4) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float64), -1, 1)


def _blur(channels: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an HxWxC float array (edges replicated); numpy only, any dtype."""
    if sigma < 0.3:
        return channels
    radius = max(1, int(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = channels
    for axis in (0, 1):
        pad = [(0, 0)] * channels.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, tap in enumerate(taps):
            acc += tap * np.take(padded, np.arange(k, k + n), axis=axis)
        out = acc
    return out


def _forward_scatter(direct: np.ndarray, z: np.ndarray, p: WaterParams, scale: float) -> np.ndarray:
    """Blend the direct signal with blurred copies, the blur and its share growing with range (sigma ~ z)."""
    # Sigma per metre of range, in pixels relative to a 256 px frame (scale = size / 256).
    sigmas = (0.0, 1.0 * scale, 2.5 * scale, 5.0 * scale)
    levels = [direct] + [_blur(direct, s) for s in sigmas[1:]]
    beta = -math.log(0.9) * p.turbidity  # the range over which scatter builds up
    share = (p.forward_scatter * (1 - np.exp(-beta * z)))[..., None]
    # Pick the blur level from the range: <1 m sharp, ~8 m the widest.
    pos = np.clip(np.log2(1 + z) / math.log2(9) * 3, 0, 3)[..., None]
    lo = np.floor(pos).astype(int)
    frac = pos - lo
    stack = np.stack(levels + [levels[-1]], axis=0)
    rows, cols = np.indices(z.shape)
    blurred = (1 - frac) * stack[lo[..., 0], rows, cols] + frac * stack[lo[..., 0] + 1, rows, cols]
    return (1 - share) * direct + share * blurred


def _marine_snow(rng: np.random.Generator, height: int, width: int, density: float) -> np.ndarray:
    """A mask of small soft bright particles near the camera (not attenuated, slightly out of focus)."""
    count = rng.poisson(density * height * width / 10_000)
    canvas = Image.new("L", (width, height), 0)
    if count:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(canvas)
        for _ in range(count):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.4, 1.6) * max(1.0, width / 256)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.uniform(100, 255)))
        canvas = canvas.filter(ImageFilter.GaussianBlur(0.6 * max(1.0, width / 256)))
    return np.asarray(canvas, dtype=np.float64) / 255.0


def render(image: np.ndarray, depth: np.ndarray | None, params: WaterParams, rng: np.random.Generator) -> np.ndarray:
    """The underwater image (uint8 HxWx3, before JPEG) of an in-air uint8 image with a range map in metres."""
    h, w = image.shape[:2]
    z = default_range_map(h, w, params.range_m) if depth is None else np.asarray(depth, dtype=np.float64)
    if z.shape != (h, w):
        raise ValueError(f"depth map shape {z.shape} does not match the image {(h, w)}")
    z = np.clip(z, 0.05, FAR_RANGE_M)
    scene = srgb_to_linear(image.astype(np.float64) / 255.0)
    n = np.array(JERLOV_N[params.water_type])
    coef = -np.log(n)  # per-metre attenuation, 1/m
    # Turbidity varies smoothly over the frame (the "turbidity", the optics doc's model 3).
    turb = params.turbidity * (1 + params.turbidity_variation * _smooth_field(rng, h, w))[..., None]
    ambient = n**params.light_depth_m  # daylight colour after coming down D metres
    direct = scene * ambient * np.exp(-coef * turb * z[..., None])
    if params.artificial_light > 0:
        # A light beside the camera: cone falloff off-axis, inverse square, attenuated out and back. Its power
        # is set, as a photographer would, to give the subject about `artificial_light` x the daylight there.
        yy, xx = np.mgrid[0:h, 0:w]
        off = ((xx - w * 0.5) / w) ** 2 + ((yy - h * 0.45) / h) ** 2
        cone = np.exp(-off / 0.12)[..., None]
        falloff = np.minimum((params.range_m / np.maximum(z, 0.05)) ** 2, 4.0)[..., None]
        lamp = params.artificial_light * float(ambient.max()) * cone * falloff
        direct = direct + scene * np.array([1.0, 0.95, 0.85]) * lamp * np.exp(-2 * coef * turb * z[..., None])
    direct = _forward_scatter(direct, z, params, scale=w / 256)
    # Veiling light B_inf: ambient light scattered toward the camera, coloured by the water (red weakest).
    # Its strength (backscatter x 0.25, about 0.05-0.12 of the ambient light with the sampled range) was
    # calibrated so renderings' UCIQE matches real EUVP photos (docs/reefscenes-report.md); stronger veils
    # wash the contrast out below any real photo's. The backscatter coefficient is 0.9x the direct one
    # (the revised model's beta_B != beta_D).
    veil = params.backscatter * 0.25 * ambient * n**2
    backscatter = veil * (1 - np.exp(-coef * turb * 0.9 * z[..., None]))
    out = direct + backscatter
    yy, xx = np.mgrid[0:h, 0:w]
    radius2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    out *= (1 - params.vignetting * 0.5 * radius2)[..., None]
    # Camera: auto exposure to a target mean luminance, a partial grey-world white balance, then noise whose
    # share grows with the gain (dim scenes are noisy).
    gain = params.exposure / max(float((out @ np.array([0.2126, 0.7152, 0.0722])).mean()), 1e-6)
    out *= min(gain, 400.0)
    means = out.reshape(-1, 3).mean(axis=0)
    balance = (means.mean() / np.maximum(means, 1e-6)) ** params.white_balance
    out *= balance
    if params.marine_snow > 0:
        snow = _marine_snow(rng, h, w, params.marine_snow)[..., None]
        out = out * (1 - snow) + snow * np.clip(out.max() * 0.9, 0.6, 1.0)
    read = params.noise * math.sqrt(min(gain, 100.0) / 10)
    out = out + rng.normal(0, 1, out.shape) * np.sqrt(np.clip(out, 0, None) * 0.002 + read**2)
    encoded = linear_to_srgb(out)
    encoded = (1 - params.contrast) * encoded + params.contrast * encoded * encoded * (3 - 2 * encoded)
    return np.round(encoded * 255).astype(np.uint8)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def underwater(
    image,
    depth=None,
    water_type: str | None = None,
    range_m: float | None = None,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    jpeg: bool = True,
    return_params: bool = False,
    **overrides,
):
    """Render an in-air image as if photographed underwater; usable as a training augmentation.

    ``image``: PIL image or HxWx3 uint8 array (the same type comes back). ``depth``: range in metres per
    pixel, or None for :func:`default_range_map`. Every :class:`WaterParams` field not given (``water_type``,
    ``range_m`` or any other as a keyword) is sampled from ``rng`` (or a generator seeded with ``seed``).
    With ``jpeg`` the result goes through JPEG at the sampled quality. ``return_params`` also returns the
    parameters used, as a dict.
    """
    rng = rng if rng is not None else np.random.default_rng(seed)
    is_pil = hasattr(image, "convert")
    arr = np.asarray(image.convert("RGB")) if is_pil else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {arr.dtype} {arr.shape}")
    if water_type is not None and water_type not in JERLOV_N:
        raise ValueError(f"unknown Jerlov water type {water_type!r}; expected one of {', '.join(WATER_TYPES)}")
    params = sample_params(rng, water_type)
    fields = WaterParams.__dataclass_fields__
    unknown = set(overrides) - set(fields)
    if unknown:
        raise TypeError(f"unknown underwater() parameters: {', '.join(sorted(unknown))}")
    for key, value in {"water_type": water_type, "range_m": range_m, **overrides}.items():
        if value is not None:
            setattr(params, key, value)
    if depth is not None:
        depth = np.asarray(depth, dtype=np.float64)
        if range_m is None:  # the metadata should describe the range actually rendered
            params.range_m = float(np.median(depth))
    out = render(arr, depth, params, rng)
    if jpeg and params.jpeg_quality:
        out = jpeg_roundtrip(out, params.jpeg_quality)
    result = Image.fromarray(out) if is_pil else out
    return (result, params.to_dict()) if return_params else result
