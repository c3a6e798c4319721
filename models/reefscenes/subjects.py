"""ReefScenes subjects: the two-canvas painter and one drawing function per marine kind (PIL + numpy only).

A :class:`Painter` draws every shape twice: in colour on the RGB canvas and, with the current object's label,
on the label canvas, so :func:`reefcap.models.reefscenes.painter.paint` can tell which object covered each pixel
(the range map). :data:`DRAW` maps each kind of :data:`~reefcap.models.reefscenes.scenes.CATALOGUE` to the
function that draws one instance of it; each takes the painter, the centre and length in canvas pixels, the
colour, the facing (+1 right, -1 left), the instance's own generator and the variant name.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from reefcap.models.reefscenes.scenes import COLOURS

SUPERSAMPLE = 2  # drawing happens at this multiple of the output size and is downsampled, for smooth edges


def shade(rgb, factor: float) -> tuple[int, int, int]:
    """``rgb`` brightened (factor > 1) or darkened, clipped to 0..255."""
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


def jitter(rng, rgb, amount: float = 0.12) -> tuple[int, int, int]:
    """``rgb`` shaded by a random factor within 1 +- ``amount``: no two objects of one colour look stamped."""
    return shade(rgb, 1 + rng.uniform(-amount, amount))


class Painter:
    """Draws on the colour canvas and, with the current object's label, on the label canvas."""

    def __init__(self, size: int):
        self.size = size * SUPERSAMPLE
        self.rgb = Image.new("RGB", (self.size, self.size))
        self.labels = Image.new("L", (self.size, self.size), 0)
        self.d = ImageDraw.Draw(self.rgb)
        self.m = ImageDraw.Draw(self.labels)
        self.label = 0

    def px(self, v: float) -> float:
        """A fraction of the frame in canvas pixels."""
        return v * self.size

    def ellipse(self, cx, cy, rx, ry, fill, label=True):
        """An ellipse centred on (cx, cy); ``label=False`` leaves the label canvas alone (e.g. bubbles)."""
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        self.d.ellipse(box, fill=fill)
        if label:
            self.m.ellipse(box, fill=self.label)

    def polygon(self, pts, fill, label=True):
        """A filled polygon through ``pts``."""
        self.d.polygon(pts, fill=fill)
        if label:
            self.m.polygon(pts, fill=self.label)

    def line(self, pts, fill, width, label=True):
        """A polyline of at least one pixel's width (curved joints on the colour canvas only)."""
        self.d.line(pts, fill=fill, width=max(1, int(width)), joint="curve")
        if label:
            self.m.line(pts, fill=self.label, width=max(1, int(width)))


# --- subjects ------------------------------------------------------------------------------------------------


def _fish(p: Painter, cx, cy, length, col, facing, rng, variant):
    tall = {"angelfish": 0.75, "pufferfish": 0.6, "barracuda": 0.18, "clownfish": 0.42}.get(variant, 0.4)
    if variant == "angelfish":  # its fins make it taller than long: keep it inside the frame
        length *= 0.7
    rx, ry = length / 2, length * tall / 2
    tail_x = cx - facing * rx * 0.9
    p.polygon(
        [(tail_x, cy), (tail_x - facing * rx * 0.6, cy - ry * 0.8), (tail_x - facing * rx * 0.6, cy + ry * 0.8)],
        shade(col, 0.8),
    )
    if variant == "angelfish":  # long dorsal and anal fins
        p.polygon(
            [(cx, cy - ry * 0.8), (cx - facing * rx * 0.9, cy - ry * 1.9), (cx - facing * rx * 0.5, cy)],
            shade(col, 0.85),
        )
        p.polygon(
            [(cx, cy + ry * 0.8), (cx - facing * rx * 0.9, cy + ry * 1.9), (cx - facing * rx * 0.5, cy)],
            shade(col, 0.85),
        )
    p.ellipse(cx, cy, rx, ry, col)
    p.ellipse(cx, cy + ry * 0.3, rx * 0.8, ry * 0.45, shade(col, 1.15))  # lighter belly
    if variant == "clownfish":
        for off in (0.45, 0.0, -0.5):
            bx = cx + facing * rx * off
            p.polygon(
                [
                    (bx - rx * 0.08, cy - ry),
                    (bx + rx * 0.08, cy - ry),
                    (bx + rx * 0.08, cy + ry),
                    (bx - rx * 0.08, cy + ry),
                ],
                COLOURS["white"],
            )
    elif variant in ("reef fish", "angelfish") and rng.random() < 0.6:
        stripe = jitter(rng, COLOURS[str(rng.choice(["black", "white", "blue", "yellow"]))])
        for k in range(int(rng.integers(2, 5))):
            bx = cx + facing * rx * (0.5 - 0.3 * k)
            p.line([(bx, cy - ry * 0.8), (bx, cy + ry * 0.8)], stripe, rx * 0.12)
    elif variant == "pufferfish":
        for a in np.linspace(0, 2 * math.pi, 14, endpoint=False):
            p.line(
                [
                    (cx + rx * math.cos(a), cy + ry * math.sin(a)),
                    (cx + rx * 1.2 * math.cos(a), cy + ry * 1.2 * math.sin(a)),
                ],
                shade(col, 0.6),
                2,
            )
    ex = cx + facing * rx * 0.6
    p.ellipse(ex, cy - ry * 0.2, ry * 0.16, ry * 0.16, (245, 245, 240))
    p.ellipse(ex, cy - ry * 0.2, ry * 0.08, ry * 0.08, (15, 15, 15))


def _turtle(p, cx, cy, length, col, facing, rng, variant):
    rx, ry = length * 0.38, length * 0.28
    skin = shade(col, 1.25)
    for sx, sy in ((0.55, -0.9), (0.55, 0.9), (-0.6, -0.7), (-0.6, 0.7)):
        fx, fy = cx + facing * rx * sx, cy + ry * sy
        p.ellipse(fx + facing * rx * 0.2, fy + ry * 0.25 * np.sign(sy), rx * 0.45, ry * 0.28, skin)
    p.ellipse(cx + facing * rx * 1.15, cy, rx * 0.3, ry * 0.32, skin)
    p.ellipse(cx, cy, rx, ry, col)
    for k in range(6):  # shell plates
        a = k * math.pi / 3
        p.ellipse(cx + rx * 0.45 * math.cos(a), cy + ry * 0.45 * math.sin(a), rx * 0.22, ry * 0.22, shade(col, 0.75))
    p.ellipse(cx, cy, rx * 0.25, ry * 0.25, shade(col, 0.8))


def _ray(p, cx, cy, length, col, facing, rng, variant):
    w, h = length * 0.55, length * 0.32
    p.line([(cx - facing * w * 0.3, cy), (cx - facing * w * 1.4, cy + h * 0.2)], shade(col, 0.7), max(2, length * 0.03))
    pts = [(cx + facing * w * 0.5, cy), (cx, cy - h), (cx - facing * w * 0.4, cy), (cx, cy + h)]
    if variant == "manta ray":
        pts = [
            (cx + facing * w * 0.35, cy),
            (cx - facing * w * 0.1, cy - h * 1.5),
            (cx - facing * w * 0.35, cy),
            (cx - facing * w * 0.1, cy + h * 1.5),
        ]
    p.polygon(pts, col)
    for _ in range(int(12 * (variant == "stingray"))):
        p.ellipse(
            cx + rng.uniform(-0.25, 0.2) * w, cy + rng.uniform(-0.45, 0.45) * h, w * 0.04, w * 0.04, COLOURS["white"]
        )


def _shark(p, cx, cy, length, col, facing, rng, variant):
    rx, ry = length / 2, length * 0.11
    p.polygon(
        [
            (cx - facing * rx * 0.95, cy),
            (cx - facing * rx * 1.3, cy - ry * 2.2),
            (cx - facing * rx * 1.15, cy + ry * 1.5),
        ],
        col,
    )
    p.polygon(
        [(cx, cy - ry * 0.8), (cx - facing * rx * 0.25, cy - ry * 2.6), (cx - facing * rx * 0.35, cy - ry * 0.5)],
        shade(col, 0.85),
    )
    p.polygon(
        [
            (cx + facing * rx * 0.2, cy + ry * 0.5),
            (cx - facing * rx * 0.05, cy + ry * 2.0),
            (cx - facing * rx * 0.1, cy + ry * 0.6),
        ],
        shade(col, 0.85),
    )
    p.ellipse(cx, cy, rx, ry, col)
    p.ellipse(cx, cy + ry * 0.4, rx * 0.85, ry * 0.5, (226, 226, 222))
    p.ellipse(cx + facing * rx * 0.72, cy - ry * 0.2, ry * 0.15, ry * 0.15, (10, 10, 10))


def _jellyfish(p, cx, cy, length, col, facing, rng, variant):
    r = length * 0.3
    for k in range(7):
        x0 = cx - r * 0.8 + k * r * 1.6 / 6
        pts = [(x0 + math.sin(t * 1.5 + k) * r * 0.15, cy + t * r * 0.5) for t in range(6)]
        p.line(pts, shade(col, 0.85), max(1, length * 0.02))
    p.d.pieslice((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=col)
    p.m.pieslice((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=p.label)
    p.ellipse(cx, cy - r * 0.4, r * 0.4, r * 0.25, shade(col, 1.2))


def _diver(p, cx, cy, length, col, facing, rng, variant):
    suit, L = col, length
    head = (cx + facing * L * 0.42, cy - L * 0.02)
    p.line([(cx - facing * L * 0.2, cy), (cx - facing * L * 0.45, cy + L * 0.05)], suit, L * 0.07)  # legs
    p.polygon(
        [(cx - facing * L * 0.43, cy), (cx - facing * L * 0.6, cy - L * 0.04), (cx - facing * L * 0.6, cy + L * 0.14)],
        jitter(rng, COLOURS["yellow"]),
    )  # fins
    p.ellipse(cx + facing * L * 0.1, cy, L * 0.3, L * 0.08, suit)  # torso
    p.ellipse(cx + facing * L * 0.05, cy - L * 0.09, L * 0.18, L * 0.045, COLOURS["yellow"])  # tank
    p.line([(cx + facing * L * 0.25, cy), (cx + facing * L * 0.5, cy + L * 0.1)], col, L * 0.05)  # arm
    p.ellipse(*head, L * 0.07, L * 0.065, suit)
    p.ellipse(head[0] + facing * L * 0.03, head[1], L * 0.035, L * 0.03, (150, 200, 230))  # mask
    for k in range(4):  # bubbles rising
        p.ellipse(
            head[0] + rng.uniform(-0.03, 0.03) * L,
            head[1] - L * (0.12 + 0.1 * k),
            L * 0.015,
            L * 0.015,
            (235, 240, 245),
            label=False,
        )


def _starfish(p, cx, cy, length, col, facing, rng, variant):
    r, spin = length / 2, rng.uniform(0, math.pi)
    pts = []
    for k in range(10):
        a = spin + k * math.pi / 5
        rr = r if k % 2 == 0 else r * 0.38
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a) * 0.6))
    p.polygon(pts, col)
    for _ in range(8):
        p.ellipse(
            cx + rng.uniform(-0.3, 0.3) * r, cy + rng.uniform(-0.15, 0.15) * r, r * 0.04, r * 0.04, shade(col, 1.3)
        )


def _anemone(p, cx, cy, length, col, facing, rng, variant):
    r = length / 2
    p.ellipse(cx, cy, r * 0.45, r * 0.3, shade(col, 0.7))
    for k in range(18):
        a = math.pi + k * math.pi / 17
        tip = (cx + r * math.cos(a) * rng.uniform(0.8, 1.1), cy + r * 0.9 * math.sin(a) * rng.uniform(0.8, 1.1))
        p.line([(cx, cy - r * 0.1), tip], jitter(rng, col, 0.2), r * 0.1)
        p.ellipse(*tip, r * 0.06, r * 0.06, shade(col, 1.3))


def _coral(p, cx, cy, length, col, facing, rng, variant):
    r = length / 2
    if variant == "brain coral":
        p.ellipse(cx, cy - r * 0.4, r, r * 0.7, col)
        for k in range(6):
            y = cy - r * 0.95 + k * r * 0.23
            pts = [(cx - r * 0.8 + t * r * 0.16, y + math.sin(t * 1.7 + k) * r * 0.06) for t in range(11)]
            p.line(pts, shade(col, 0.65), max(1, r * 0.05))
    elif variant == "table coral":
        p.line([(cx, cy), (cx, cy - r * 0.6)], shade(col, 0.8), r * 0.2)
        p.ellipse(cx, cy - r * 0.7, r * 1.1, r * 0.22, col)
    else:  # branching coral and sea fans grow from one point
        n, spread = (9, 1.2) if variant == "sea fan" else (7, 1.0)
        for k in range(n):
            a = -math.pi / 2 + (k / (n - 1) - 0.5) * spread * 1.6
            tip = (cx + math.cos(a) * r, cy - r * 0.1 + math.sin(a) * r * 1.2)
            p.line([(cx, cy), tip], jitter(rng, col, 0.15), r * (0.05 if variant == "sea fan" else 0.14))
            if variant != "sea fan":
                mid = ((cx + tip[0]) / 2, (cy + tip[1]) / 2)
                p.line(
                    [mid, (mid[0] + r * 0.25 * math.cos(a + 0.6), mid[1] + r * 0.25 * math.sin(a + 0.6))], col, r * 0.1
                )
        if variant == "sea fan":
            for k in range(1, 5):
                p.d.arc(
                    (cx - r * k / 4, cy - r * 1.2 * k / 4, cx + r * k / 4, cy + r * 1.2 * k / 4),
                    200,
                    340,
                    fill=col,
                    width=2,
                )


def _kelp(p, cx, cy, length, col, facing, rng, variant):
    for _ in range(int(rng.integers(2, 5))):
        x0, phase = cx + rng.uniform(-0.2, 0.2) * length, rng.uniform(0, 6)
        pts = [(x0 + math.sin(phase + t * 0.8) * length * 0.05, cy - t * length / 10) for t in range(11)]
        p.line(pts, jitter(rng, col, 0.2), length * 0.035)
        for t in range(2, 10, 2):
            p.ellipse(pts[t][0] + length * 0.04, pts[t][1], length * 0.05, length * 0.02, col)


def _rock(p, cx, cy, length, col, facing, rng, variant):
    r = length / 2
    pts = [
        (cx + r * math.cos(a) * rng.uniform(0.8, 1.1), cy - r * 0.3 + r * 0.6 * math.sin(a) * rng.uniform(0.8, 1.1))
        for a in np.linspace(0, 2 * math.pi, 9)[:-1]
    ]
    p.polygon(pts, col)
    p.ellipse(cx - r * 0.2, cy - r * 0.5, r * 0.4, r * 0.15, shade(col, 1.2))


def _wreck(p, cx, cy, length, col, facing, rng, variant):
    w, h = length / 2, length * 0.16
    hull = [(cx - w, cy - h), (cx + w, cy - h * 1.4), (cx + w * 0.8, cy + h * 0.3), (cx - w * 0.85, cy + h * 0.3)]
    p.polygon(hull, col)
    p.polygon(
        [
            (cx - w * 0.4, cy - h),
            (cx + w * 0.1, cy - h * 1.1),
            (cx + w * 0.1, cy - h * 2),
            (cx - w * 0.35, cy - h * 1.9),
        ],
        shade(col, 0.8),
    )
    p.line([(cx + w * 0.4, cy - h * 1.3), (cx + w * 0.5, cy - h * 3.5)], shade(col, 0.7), h * 0.15)
    for k in range(5):
        p.ellipse(cx - w * 0.6 + k * w * 0.3, cy - h * 0.4, h * 0.12, h * 0.12, (40, 30, 25))


DRAW = {
    "fish": _fish,
    "turtle": _turtle,
    "ray": _ray,
    "shark": _shark,
    "jellyfish": _jellyfish,
    "diver": _diver,
    "starfish": _starfish,
    "anemone": _anemone,
    "coral": _coral,
    "kelp": _kelp,
    "rock": _rock,
    "wreck": _wreck,
}
