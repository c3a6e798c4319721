"""ReefScenes, one scene at a time (the renderer ``reefcap data reefscenes`` writes its datasets with), and the
probe set: a small deterministic ReefScenes test set the library renders on demand.

The quality gate (:mod:`reefcap.models.policy.gate`) scores candidate and serving models on the probe set when it has
no better gate set (no configured COCO file, too little held-out feedback). It lives here, with the scene
sampler, painter, optics and caption grammar it needs, so the server can render it without the training
package. The probe scenes use their own seed, so no ReefScenes dataset generated with the usual seeds holds
them.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from reefcap.models.reefscenes.captions import describe_conditions, make_captions
from reefcap.models.reefscenes.optics import render, sample_params
from reefcap.models.reefscenes.painter import paint
from reefcap.models.reefscenes.scenes import sample_scene, scene_rng

SURFACE_JPEG_QUALITY = 92
# Random streams per scene: layout, water, rendering noise, captions. Fixed numbers keep old seeds valid.
STREAM_LAYOUT, STREAM_WATER, STREAM_RENDER, STREAM_CAPTIONS = 0, 1, 2, 3


def jpeg_bytes(arr: np.ndarray, quality: int) -> bytes:
    """An RGB array as JPEG bytes at ``quality``: how every ReefScenes image is stored."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _scene_metadata(scene: dict) -> dict:
    subj, ref = scene["subject"], scene["reference"]
    meta = {
        "background": scene["background"],
        "subject": subj["kind"],
        "variant": subj["variant"],
        "colour": subj["colour"],
        "count": subj["count"],
        "relation": scene["relation"],
        "reference": ref["variant"] if ref else None,
        "scenery": [g["variant"] for g in scene["scenery"]],
    }
    return meta


def render_scene(seed: int, scene_id: int, size: int, domains) -> dict:
    """Everything one scene contributes: per domain the JPEG bytes, five captions and the metadata."""
    scene = sample_scene(scene_rng(seed, scene_id, STREAM_LAYOUT), scene_id)
    air, rel_range = paint(scene, size)
    base_meta = _scene_metadata(scene)
    out = {}
    if "surface" in domains:
        captions = make_captions(scene_rng(seed, scene_id, STREAM_CAPTIONS), scene)
        out["surface"] = (jpeg_bytes(air, SURFACE_JPEG_QUALITY), captions, base_meta)
    if "underwater" in domains:
        params = sample_params(scene_rng(seed, scene_id, STREAM_WATER))
        image = render(air, rel_range * params.range_m, params, scene_rng(seed, scene_id, STREAM_RENDER))
        water = params.to_dict()
        conditions = describe_conditions(water, tuple(image.reshape(-1, 3).mean(axis=0)))
        # The same caption stream as in air: the underwater captions are the in-air ones, some naming the water.
        captions = make_captions(scene_rng(seed, scene_id, STREAM_CAPTIONS), scene, conditions)
        meta = {**base_meta, **water, "conditions": conditions}
        out["underwater"] = (jpeg_bytes(image, params.jpeg_quality), captions, meta)
    return out


PROBE_SEED = 104_729  # not a seed any bundled dataset or documented command uses
PROBE_IMAGES, PROBE_SIZE = 48, 96


@lru_cache(maxsize=4)
def probe_set(
    n: int = PROBE_IMAGES, size: int = PROBE_SIZE, domain: str = "underwater"
) -> tuple[tuple[bytes, tuple[str, ...]], ...]:
    """``n`` ReefScenes scenes rendered in ``domain`` at ``size`` px: (JPEG bytes, five reference captions) each,
    the same bytes on every call and machine (about a second for the default 48 at 96 px)."""
    out = []
    for scene_id in range(n):
        data, captions, _ = render_scene(PROBE_SEED, scene_id, size, (domain,))[domain]
        out.append((data, tuple(captions)))
    return tuple(out)
