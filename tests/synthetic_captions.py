"""A handful of synthetic captioned images (coloured shapes) written as a COCO-captions file, for training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square")


def make_dataset(root: Path, n: int = 16, seed: int = 0, size: int = 64) -> Path:
    """Write ``n`` images and two captions each; returns the COCO JSON path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 2]
        img = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 60, 3)))
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        name = f"images/{i:03d}.png"
        (root / "images").mkdir(exist_ok=True)
        img.save(root / name)
        images.append({"id": i, "file_name": name, "scene_id": i})
        annotations.append({"id": 2 * i, "image_id": i, "caption": f"A {color} {shape} on a dark background."})
        annotations.append({"id": 2 * i + 1, "image_id": i, "caption": f"a {shape} that is {color}"})
    out = root / "captions.json"
    out.write_text(json.dumps({"images": images, "annotations": annotations}))
    return out


def all_captions(coco_json: Path) -> list[str]:
    return [a["caption"] for a in json.loads(coco_json.read_text())["annotations"]]
