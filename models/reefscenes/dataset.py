"""Generate ReefScenes: the same procedural marine scenes rendered in air and underwater, with captions.

Layout on disk (the contract with the training code)::

    DIR/<domain>/{train,val,test}.json   COCO captions: info, images (id, file_name, width, height, scene_id,
                                         domain, metadata), annotations (id, image_id, caption)
    DIR/<domain>/images/<scene_id>.jpg

``domain`` is ``surface`` (in air) or ``underwater``. Image ids are the scene ids, so one id names the same
scene in both domains, and the split of a scene depends only on the seed and its id (see :func:`scene_split`),
so a scene sits in the same split in both domains, whether they are generated together or apart, and
generating more scenes never moves an existing one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from reefcap.models.data.records import SPLITS, CaptionRecord, DatasetError, write_coco
from reefcap.models.reefscenes.probe import STREAM_RENDER, jpeg_bytes, render_scene
from reefcap.models.reefscenes.scenes import scene_rng

DOMAINS = ("surface", "underwater")
DEFAULT_COUNTS = {"surface": 10_000, "underwater": 3_176}  # an in-air pretraining set; UICD's size
RATIOS = (0.7, 0.15, 0.15)


@dataclass
class ReefScenesConfig:
    """What ``reefcap data reefscenes`` generates; saved in every JSON's ``info``."""

    seed: int = 0
    size: int = 128
    counts: dict = field(default_factory=lambda: dict(DEFAULT_COUNTS))  # domain -> number of scenes
    workers: int = 2


def default_counts(domain: str = "both", images: int | None = None, surface_images: int | None = None) -> dict:
    """Scenes per domain for ``--domain``/``--images``/``--surface-images``: by default 10,000 in air and
    3,176 underwater (scenes 0-3175 are rendered in both); ``images`` sets every chosen domain."""
    domains = DOMAINS if domain == "both" else (domain,)
    counts = {d: images if images is not None else DEFAULT_COUNTS[d] for d in domains}
    if "surface" in counts and surface_images is not None:
        counts["surface"] = surface_images
    return counts


SPLIT_BLOCK = 20  # 70/15/15 of 20 scenes is exactly 14/3/3


def scene_split(seed: int, scene_id: int) -> str:
    """The split of one scene. Scenes come in blocks of 20 ids, each block shuffled by the seed and cut 14/3/3,
    so any first N scenes split close to 70/15/15 (exactly for multiples of 20: even a 20-scene smoke test has
    a validation and a test split), and the answer never depends on how many scenes are generated."""
    block, slot = divmod(int(scene_id), SPLIT_BLOCK)
    rank = int(np.random.default_rng([int(seed), block, 7]).permutation(SPLIT_BLOCK)[slot])
    cuts = np.cumsum([round(r * SPLIT_BLOCK) for r in RATIOS])
    return SPLITS[int(np.searchsorted(cuts, rank, side="right"))]


def _work(job: tuple) -> tuple[int, dict]:
    seed, scene_id, size, domains, root = job
    result = render_scene(seed, scene_id, size, domains)
    summary = {}
    for domain, (data, captions, meta) in result.items():
        path = Path(root) / domain / "images" / f"{scene_id:06d}.jpg"
        path.write_bytes(data)
        summary[domain] = (captions, meta)
    return scene_id, summary


def generate(out, config: ReefScenesConfig, progress: bool = True, force: bool = False) -> dict:
    """Write the dataset under ``out``; returns counts per domain and split and the elapsed seconds."""
    from tqdm import tqdm

    out = Path(out)
    counts = {d: int(n) for d, n in config.counts.items() if n}
    if not counts or any(d not in DOMAINS for d in counts) or any(n < 0 for n in counts.values()):
        raise DatasetError(f"counts must name domains among {DOMAINS} with positive sizes, got {config.counts}")
    if config.size < 32 or config.size > 1024:
        raise DatasetError(f"--size must be between 32 and 1024 pixels, got {config.size}")
    for domain in counts:
        folder = out / domain
        if folder.exists() and any(folder.iterdir()):
            if not force:
                raise DatasetError(f"{folder} is not empty; pass --force to replace it")
            shutil.rmtree(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
    n_scenes = max(counts.values())
    jobs = [
        (config.seed, i, config.size, tuple(d for d, n in counts.items() if i < n), str(out)) for i in range(n_scenes)
    ]
    records: dict[str, dict[str, list]] = {d: {s: [] for s in SPLITS} for d in counts}
    start = time.perf_counter()
    bar = tqdm(total=n_scenes, desc="reefscenes", unit="scene", file=sys.stderr, disable=not progress)
    workers = max(1, min(config.workers, os.cpu_count() or 1))
    pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_work, jobs, chunksize=8) if pool else map(_work, jobs)
        for scene_id, summary in results:
            split = scene_split(config.seed, scene_id)
            for domain, (captions, meta) in summary.items():
                path = out / domain / "images" / f"{scene_id:06d}.jpg"
                meta = {**meta, "scene_id": scene_id, "domain": domain, "width": config.size, "height": config.size}
                records[domain][split].append(CaptionRecord(scene_id, path.resolve(), tuple(captions), meta))
            bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - start
    info = {"description": "ReefScenes synthetic underwater captioning benchmark (reefcap)", **asdict(config)}
    info["counts"] = counts
    del info["workers"]  # the output does not depend on it, so it must not appear in it
    for domain, splits in records.items():
        for split, recs in splits.items():
            write_coco(recs, out / domain / f"{split}.json", info={**info, "domain": domain, "split": split})
    summary = {d: {s: len(v) for s, v in splits.items()} for d, splits in records.items()}
    return {"out": str(out), "counts": summary, "seconds": round(elapsed, 1), "workers": workers}


def _wet_one(job: tuple) -> tuple[int, dict]:
    from reefcap.models.data.images import load_dataset_image
    from reefcap.models.reefscenes.optics import underwater

    index, src, dst, seed, water_type, max_side = job
    # The wet copy is training data: decode the in-air photo as training and serving do (upright, alpha on white).
    im = load_dataset_image(Path(src))
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    arr = np.asarray(im)
    image, params = underwater(
        arr, rng=scene_rng(seed, index, STREAM_RENDER), water_type=water_type, jpeg=False, return_params=True
    )
    Path(dst).write_bytes(jpeg_bytes(image, params["jpeg_quality"]))
    return index, {**params, "width": image.shape[1], "height": image.shape[0]}


def wet_dataset(
    records,
    out,
    seed: int = 0,
    water_type: str | None = None,
    workers: int = 2,
    max_side: int | None = None,
    progress: bool = True,
) -> dict:
    """Turn an in-air captioned dataset into an underwater one: every image through :func:`optics.underwater`
    (no range map: the default one), captions kept, water parameters added to the metadata, COCO splits
    written (the data's own split when it has one, else 70/15/15 from ``seed``)."""
    from tqdm import tqdm

    from reefcap.models.data.records import split_records

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = list(records)
    jobs = [
        (i, str(r.path), str(out / "images" / f"{i:06d}.jpg"), seed, water_type, max_side)
        for i, r in enumerate(records)
    ]
    params: dict[int, dict] = {}
    workers = max(1, min(workers, os.cpu_count() or 1))
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_wet_one, jobs, chunksize=4) if pool else map(_wet_one, jobs)
        for index, p in tqdm(results, total=len(jobs), desc="underwater", file=sys.stderr, disable=not progress):
            params[index] = p
    finally:
        if pool:
            pool.close()
            pool.join()
    wet = [
        CaptionRecord(
            r.image_id,
            (out / "images" / f"{i:06d}.jpg").resolve(),
            r.captions,
            {**r.metadata, **params[i], "domain": "underwater", "source": str(r.path)},
        )
        for i, r in enumerate(records)
    ]
    splits = split_records(wet, seed=seed)
    for name, recs in splits.items():
        write_coco(
            recs,
            out / f"{name}.json",
            info={"description": "rendered underwater by reefcap", "seed": seed, "water_type": water_type},
        )
    return {"out": str(out), "counts": {k: len(v) for k, v in splits.items()}}
