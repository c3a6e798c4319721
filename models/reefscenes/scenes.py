"""ReefScenes layouts: which marine subjects, where, how far, on what background; deterministic from a seed.

A scene is a plain JSON-able dict, so it can be stored in the dataset metadata and captioned without the
image. Positions are fractions of the frame (x right, y down); ``rel_range`` is the camera range relative
to the main subject's (1.0), which the underwater renderer scales to metres.
"""

from __future__ import annotations

import numpy as np

BACKGROUNDS = ("sand", "reef", "rocky bottom", "open water")

# kind -> (swims, real length in metres, countable, variants -> colours). Colours are names from COLOURS.
CATALOGUE: dict[str, dict] = {
    "fish": {
        "swims": True,
        "size": 0.3,
        "countable": True,
        "variants": {
            "reef fish": ("yellow", "blue", "red", "orange", "purple", "silver"),
            "angelfish": ("yellow", "blue", "black", "silver"),
            "clownfish": ("orange",),
            "pufferfish": ("yellow", "brown", "grey"),
            "barracuda": ("silver", "grey"),
        },
    },
    "turtle": {"swims": True, "size": 1.0, "countable": True, "variants": {"sea turtle": ("green", "brown")}},
    "ray": {
        "swims": True,
        "size": 1.5,
        "countable": True,
        "variants": {"stingray": ("brown", "grey", "blue"), "manta ray": ("black", "grey")},
    },
    "shark": {"swims": True, "size": 2.0, "countable": True, "variants": {"reef shark": ("grey",)}},
    "jellyfish": {
        "swims": True,
        "size": 0.4,
        "countable": True,
        "variants": {"jellyfish": ("pink", "white", "purple", "orange")},
    },
    "diver": {"swims": True, "size": 1.8, "countable": True, "variants": {"scuba diver": ("black", "blue", "red")}},
    "starfish": {
        "swims": False,
        "size": 0.25,
        "countable": True,
        "variants": {"starfish": ("orange", "red", "purple", "blue", "yellow")},
    },
    "anemone": {
        "swims": False,
        "size": 0.35,
        "countable": True,
        "variants": {"sea anemone": ("green", "pink", "purple", "orange")},
    },
    "coral": {
        "swims": False,
        "size": 0.8,
        "countable": False,
        "variants": {
            "brain coral": ("yellow", "brown", "green"),
            "branching coral": ("purple", "pink", "orange", "blue"),
            "sea fan": ("purple", "red", "orange"),
            "table coral": ("brown", "green"),
        },
    },
    "kelp": {"swims": False, "size": 2.0, "countable": False, "variants": {"kelp": ("green", "brown")}},
    "rock": {"swims": False, "size": 1.0, "countable": True, "variants": {"rock": ("grey", "brown")}},
    "wreck": {"swims": False, "size": 6.0, "countable": False, "variants": {"shipwreck": ("brown",)}},
}
KINDS = tuple(CATALOGUE)
RELATIONS = ("above", "below", "beside", "in front of")

# Colour names (as captions say them) -> in-air sRGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "yellow": (236, 200, 40),
    "orange": (240, 125, 30),
    "red": (200, 40, 45),
    "blue": (45, 90, 205),
    "purple": (130, 60, 165),
    "pink": (236, 130, 172),
    "green": (60, 150, 62),
    "brown": (135, 88, 48),
    "grey": (128, 130, 136),
    "silver": (192, 197, 204),
    "white": (236, 236, 230),
    "black": (34, 34, 40),
}

# Weights for picking the main subject: animals most often, as in survey and diving photos.
SUBJECT_WEIGHTS = {
    "fish": 6,
    "turtle": 3,
    "ray": 2,
    "shark": 2,
    "jellyfish": 2,
    "diver": 2,
    "starfish": 2,
    "anemone": 2,
    "coral": 3,
    "kelp": 1,
    "rock": 0.5,
    "wreck": 1,
}


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _group(rng: np.random.Generator, kind: str, count: int, cx: float, cy: float, size: float, rel_range: float):
    """Instances of one subject group around (cx, cy), jittered so a school does not look stamped."""
    variant = _pick(rng, CATALOGUE[kind]["variants"])
    colour = _pick(rng, CATALOGUE[kind]["variants"][variant])
    facing = 1 if rng.random() < 0.5 else -1
    instances = []
    for i in range(count):
        dx = 0.0 if count == 1 else (i - (count - 1) / 2) * size * 0.95 + rng.uniform(-0.03, 0.03)
        dy = 0.0 if count == 1 else rng.uniform(-0.6, 0.6) * size * 0.6
        instances.append(
            {
                "x": float(np.clip(cx + dx, 0.08, 0.92)),
                "y": float(np.clip(cy + dy, 0.08, 0.95)),
                "size": float(size * rng.uniform(0.85, 1.1)),
                "rel_range": float(rel_range * rng.uniform(0.95, 1.05)),
                "facing": facing,
                "seed": int(rng.integers(2**31)),
            }
        )
    return {"kind": kind, "variant": variant, "colour": colour, "count": count, "instances": instances}


def _floor_y(rng: np.random.Generator, horizon: float, low: float = 0.0) -> float:
    return float(rng.uniform(max(horizon + 0.18, low, 0.2), 0.88))


def _main_subject(rng: np.random.Generator, kinds: list[str]) -> tuple[str, int, float]:
    """The main subject's kind, count (1-4; large animals and wrecks at most 2) and size (fraction of the frame)."""
    weights = np.array([SUBJECT_WEIGHTS[k] for k in kinds], dtype=float)
    kind = str(rng.choice(kinds, p=weights / weights.sum()))
    count = int(rng.choice([1, 1, 1, 2, 2, 3, 4])) if CATALOGUE[kind]["countable"] else 1
    if kind in ("wreck", "shark", "diver", "ray", "turtle"):
        count = min(count, 2)
    size = float(rng.uniform(0.35, 0.65) / (1 + 0.3 * (count - 1)))
    if kind == "wreck":
        size = float(rng.uniform(0.55, 0.75))
    return kind, count, size


def _relation_layout(rng, relation: str, swims: bool, ref_swims: bool, horizon: float, size: float, ref_size: float):
    """Where subject and reference go for ``relation``: (sx, sy, rx, ry, subject range, reference range, ref size)."""
    if relation == "above":  # subject above a reference lower in the frame
        ry = _floor_y(rng, horizon, 0.62) if not ref_swims else float(rng.uniform(0.62, 0.8))
        rx, sx, sy = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)), ry - ref_size * 0.6 - size * 0.7
        ref_range, subj_range = 1.0, 1.0
    elif relation == "below":  # reference swims above the subject
        sy = _floor_y(rng, horizon, 0.62) if not swims else float(rng.uniform(0.62, 0.82))
        sx, rx, ry = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)), sy - size * 0.6 - ref_size * 0.7
        ref_range, subj_range = 1.0, 1.0
    elif relation == "beside":
        left = rng.random() < 0.5
        sx, rx = (0.3, 0.72) if left else (0.7, 0.28)
        base = _floor_y(rng, horizon, 0.55) if not (swims and ref_swims) else float(rng.uniform(0.4, 0.7))
        sy = base if not swims or not ref_swims else base + float(rng.uniform(-0.05, 0.05))
        ry = base if not ref_swims or not swims else base + float(rng.uniform(-0.05, 0.05))
        if swims and not ref_swims:
            sy = base - size * 0.3
        ref_range, subj_range = 1.0, 1.0
    else:  # in front of: the subject is nearer, lower in the frame and overlaps the reference
        rx, ry = float(rng.uniform(0.35, 0.65)), _floor_y(rng, horizon, 0.45) if not ref_swims else 0.45
        sx, sy = rx + float(rng.uniform(-0.12, 0.12)), ry + float(rng.uniform(0.1, 0.2))
        ref_range, subj_range = float(rng.uniform(1.6, 2.4)), 1.0
        ref_size *= 0.8
    return sx, sy, rx, ry, subj_range, ref_range, ref_size


def _subject_and_reference(rng, kind: str, count: int, size: float, kinds: list[str], has_floor: bool, horizon: float):
    """The subject group and, two times in three, a reference object in a spatial relation: (subject, relation,
    reference), the last two None without one."""
    swims = CATALOGUE[kind]["swims"]
    ref_kinds = [k for k in kinds if k != kind and (has_floor or CATALOGUE[k]["swims"])]
    if not (rng.random() < 0.65 and ref_kinds):
        sy = _floor_y(rng, horizon, 0.5) if not swims else float(rng.uniform(0.3, 0.7))
        return _group(rng, kind, count, float(rng.uniform(0.3, 0.7)), sy, size, 1.0), None, None
    ref_kind = _pick(rng, ref_kinds)
    options = ["beside", "in front of"]
    if swims:
        options.append("above")
    if CATALOGUE[ref_kind]["swims"] and (not swims or rng.random() < 0.5):
        options.append("below")
    relation = _pick(rng, options)
    ref_size = float(rng.uniform(0.28, 0.45)) if ref_kind != "wreck" else float(rng.uniform(0.5, 0.7))
    ref_swims = CATALOGUE[ref_kind]["swims"]
    sx, sy, rx, ry, subj_range, ref_range, ref_size = _relation_layout(
        rng, relation, swims, ref_swims, horizon, size, ref_size
    )
    ref = _group(rng, ref_kind, 1, rx, max(ry, horizon + 0.1 if not ref_swims else 0.15), ref_size, ref_range)
    subject = _group(rng, kind, count, sx, float(np.clip(sy, 0.15, 0.9)), size, subj_range)
    return subject, relation, ref


def _scenery(rng: np.random.Generator, horizon: float) -> list[dict]:
    """0-3 background objects on the floor (coral, kelp, rocks, anemones)."""
    scenery = []
    for _ in range(int(rng.integers(0, 4))):
        skind = _pick(rng, ("coral", "kelp", "rock", "anemone", "coral"))
        y = _floor_y(rng, horizon)
        # Further up the floor is further away (perspective), so smaller and at a longer range.
        depth_factor = (0.95 - horizon) / max(y - horizon, 0.05)
        scenery.append(_group(rng, skind, 1, float(rng.uniform(0.05, 0.95)), y, 0.2 / depth_factor, 1.2 * depth_factor))
    return scenery


def sample_scene(rng: np.random.Generator, scene_id: int) -> dict:
    """One scene: a main subject group (1-4), perhaps a second object in a spatial relation, background scenery.

    Every draw comes from ``rng`` in a fixed order, so a (seed, scene id) always gives the same layout.
    """
    background = _pick(rng, BACKGROUNDS)
    has_floor = background != "open water"
    horizon = float(rng.uniform(-0.2, 0.35)) if has_floor else 1.0
    kinds = [k for k in KINDS if has_floor or CATALOGUE[k]["swims"]]
    kind, count, size = _main_subject(rng, kinds)
    subject, relation, ref = _subject_and_reference(rng, kind, count, size, kinds, has_floor, horizon)
    scenery = _scenery(rng, horizon) if has_floor else []
    return {
        "scene_id": int(scene_id),
        "background": background,
        "horizon": horizon,
        "floor_range": float(rng.uniform(0.7, 1.3)),  # relative range of the floor at the bottom edge
        "subject": subject,
        "relation": relation,
        "reference": ref,
        "scenery": scenery,
        "light_angle": float(rng.uniform(-0.4, 0.4)),
        "texture_seed": int(rng.integers(2**31)),
    }


def scene_rng(seed: int, scene_id: int, stream: int = 0) -> np.random.Generator:
    """The generator for one scene: independent of how scenes are spread over worker processes."""
    return np.random.default_rng([int(seed), int(scene_id), int(stream)])
