"""Draw a ReefScenes layout in air: an RGB image and a per-pixel relative range map (PIL + numpy only).

Backgrounds and compositing live here; the subjects themselves are drawn by
:mod:`reefcap.models.reefscenes.subjects`. Objects are painted far to near; each pixel remembers which object
covered it last, which gives the range map the underwater renderer needs. Drawing happens at twice the size and
is downsampled, for smooth edges.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reefcap.models.reefscenes.scenes import CATALOGUE, COLOURS
from reefcap.models.reefscenes.subjects import DRAW, Painter, jitter, shade

FAR = 1000.0  # relative range of open water beyond the scene (the renderer clips it to its far range)


# --- backgrounds ----------------------------------------------------------------------------------------------


def _background(p: Painter, scene: dict, rng: np.random.Generator) -> None:
    s, hy = p.size, int(scene["horizon"] * p.size)
    # Above the floor: the backdrop in air is a pale, slightly blue-grey haze (no water colour).
    for y in range(0, min(hy, s), 2):
        t = y / s
        p.d.rectangle((0, y, s, y + 2), fill=(int(205 - 30 * t), int(215 - 25 * t), int(225 - 20 * t)))
    if scene["background"] == "open water":
        return
    base = {"sand": (212, 192, 150), "reef": (150, 130, 100), "rocky bottom": (120, 112, 104)}[scene["background"]]
    p.d.rectangle((0, hy, s, s), fill=base)
    n = {"sand": 60, "reef": 260, "rocky bottom": 140}[scene["background"]]
    if scene["background"] != "sand":  # dark crevices between coral heads and stones
        for _ in range(n // 3):
            x, y = rng.uniform(0, s), rng.uniform(hy, s)
            r = s * 0.05 * ((y - hy) / max(s - hy, 1) * 0.9 + 0.1) * rng.uniform(0.5, 1.5)
            p.d.ellipse((x - r, y - r * 0.5, x + r, y + r * 0.5), fill=jitter(rng, (28, 24, 22), 0.3))
    palette = [COLOURS[c] for c in ("orange", "pink", "purple", "yellow", "green", "brown", "red")]
    for _ in range(n):
        y = rng.uniform(hy, s)
        scale = (y - hy) / max(s - hy, 1) * 0.9 + 0.1  # smaller towards the horizon
        x = rng.uniform(0, s)
        if scene["background"] == "sand":  # ripples and shells
            p.d.line(
                [(x, y), (x + s * 0.12 * scale, y + rng.uniform(-2, 2))],
                fill=shade(base, 0.85),
                width=max(1, int(3 * scale)),
            )
        elif scene["background"] == "reef":  # small coral heads of many colours
            r = s * 0.03 * scale * rng.uniform(0.5, 1.5)
            p.d.ellipse(
                (x - r, y - r * 0.7, x + r, y + r * 0.7),
                fill=jitter(rng, palette[int(rng.integers(len(palette)))], 0.25),
            )
        else:  # stones
            r = s * 0.04 * scale * rng.uniform(0.5, 1.5)
            p.d.ellipse((x - r, y - r * 0.6, x + r, y + r * 0.6), fill=jitter(rng, base, 0.3))


def _floor_range(scene: dict, h: int) -> np.ndarray:
    """Relative range of each row: open water far above the horizon, the floor nearer towards the bottom."""
    rows = (np.arange(h) + 0.5) / h
    horizon = scene["horizon"]
    depth = scene["floor_range"] * (1 - horizon) / np.maximum(rows - horizon, 1e-3)
    return np.where(rows > horizon, np.minimum(depth, FAR), FAR)


def paint(scene: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The in-air image (HxWx3 uint8) and relative range map (HxW float) of a scene at ``size`` pixels."""
    rng = np.random.default_rng(scene["texture_seed"])
    p = Painter(size)
    _background(p, scene, rng)
    groups = list(scene["scenery"]) + ([scene["reference"]] if scene["reference"] else []) + [scene["subject"]]
    items = [(inst, g) for g in groups for inst in g["instances"]]
    items.sort(key=lambda it: -it[0]["rel_range"])  # painter's order: far first
    ranges = [0.0]
    shadows = Image.new("L", p.labels.size, 0)
    if scene["background"] != "open water":  # cast shadows of daylight from above on the floor
        sd = ImageDraw.Draw(shadows)
        for inst, g in items:
            drop = 0.3 if CATALOGUE[g["kind"]]["swims"] else 0.03  # swimmers cast it further down
            cx, base, r = p.px(inst["x"]), p.px(inst["y"] + inst["size"] * drop), p.px(inst["size"]) * 0.5
            sd.ellipse((cx - r, base - r * 0.25, cx + r, base + r * 0.25), fill=170)
    for label, (inst, g) in enumerate(items, 1):
        p.label = label
        ranges.append(inst["rel_range"])
        col = jitter(np.random.default_rng(inst["seed"]), COLOURS[g["colour"]], 0.08)
        DRAW[g["kind"]](
            p,
            p.px(inst["x"]),
            p.px(inst["y"]),
            p.px(inst["size"]),
            col,
            inst["facing"],
            np.random.default_rng(inst["seed"]),
            g["variant"],
        )
    rgb = p.rgb.filter(ImageFilter.GaussianBlur(0.6)).resize((size, size), Image.LANCZOS)
    labels = np.asarray(p.labels.resize((size, size), Image.NEAREST))
    shade = np.asarray(shadows.filter(ImageFilter.GaussianBlur(size / 40)).resize((size, size)), dtype=np.float64)
    arr = np.asarray(rgb, dtype=np.float64) * (1 - np.where(labels > 0, 0, shade / 255))[..., None]
    # Daylight from above (and a little from one side), plus fine texture so no area is perfectly flat.
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = 1.08 - 0.22 * yy + scene["light_angle"] * 0.15 * (xx - 0.5)
    grain = rng.normal(0, 1, (size, size, 1)) * 5
    arr = np.clip(arr * light[..., None] + grain, 0, 255).astype(np.uint8)
    depth = _floor_range(scene, size)[:, None].repeat(size, axis=1)
    obj = labels > 0
    depth[obj] = np.asarray(ranges)[labels[obj]]
    return arr, depth
