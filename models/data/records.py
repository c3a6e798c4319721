"""Caption dataset records: the one record type every reader returns, deterministic train/val/test splits,
and COCO-captions writing (the format ``reefcap data``, ReefScenes and the feedback export all write).

Reading the formats users have (COCO, Karpathy, Flickr, JSONL/CSV manifests, imagefolder) is in
:mod:`reefcap.models.data.datasets`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reefcap.models.errors import ReefcapError

SPLITS = ("train", "val", "test")


class DatasetError(ReefcapError, ValueError):
    """A dataset file is missing, malformed, or points at images that do not exist."""

    code = "bad_dataset"


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its reference captions."""

    image_id: int | str
    path: Path  # absolute path to the image file
    captions: tuple[str, ...]
    metadata: dict = field(default_factory=dict, hash=False)


def _group_key(rec: CaptionRecord) -> str:
    # Images of one scene (e.g. the in-air and underwater renderings) must land in the same split.
    return str(rec.metadata.get("scene_id", rec.image_id))


def assign_splits(keys: Iterable, seed: int = 0, ratios: Sequence[float] = (0.7, 0.15, 0.15)) -> dict[str, str]:
    """Deterministic split name for each distinct key: the same keys and seed always give the same answer,
    whatever their order (keys are ranked by a seeded hash, then cut by the ratios)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DatasetError(f"split ratios must be three non-negative numbers, got {tuple(ratios)}")
    unique = sorted({str(k) for k in keys})
    ranked = sorted(unique, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    total = sum(ratios)
    n_train = round(len(ranked) * ratios[0] / total)
    n_val = round(len(ranked) * (ratios[0] + ratios[1]) / total) - n_train
    return {
        k: SPLITS[0] if i < n_train else SPLITS[1] if i < n_train + n_val else SPLITS[2] for i, k in enumerate(ranked)
    }


def stable_split(key: str, ratios: Sequence[float] = (0.7, 0.15, 0.15)) -> str:
    """The split of one key on its own, from its hash: unlike :func:`assign_splits` it never changes when
    other keys come and go, so an image held out once (e.g. the feedback store's test split, which the quality
    gate scores on) stays held out in every later export. Proportions are the ratios' only on average."""
    total = sum(ratios)
    if len(ratios) != 3 or any(r < 0 for r in ratios) or total <= 0:
        raise DatasetError(f"split ratios must be three non-negative numbers, got {tuple(ratios)}")
    u = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(1 << 48)
    return SPLITS[0] if u < ratios[0] / total else SPLITS[1] if u < (ratios[0] + ratios[1]) / total else SPLITS[2]


def split_records(
    records: Sequence[CaptionRecord], seed: int = 0, ratios=(0.7, 0.15, 0.15), respect_existing: bool = True
) -> dict[str, list[CaptionRecord]]:
    """Split records into ``train``/``val``/``test``, deterministically and by scene where records have one.

    When every record already names its split (``metadata["split"]``, e.g. from a Karpathy file or per-split
    files) and ``respect_existing`` is set, that split is kept; otherwise records are grouped by
    ``metadata["scene_id"]`` (else image id) and the groups are cut by ``ratios`` in a seeded order.
    """
    out: dict[str, list[CaptionRecord]] = {s: [] for s in SPLITS}
    existing = [r.metadata.get("split") for r in records]
    if respect_existing and records and all(s in SPLITS for s in existing):
        for rec, s in zip(records, existing, strict=True):
            out[s].append(rec)
        return out
    assignment = assign_splits((_group_key(r) for r in records), seed, ratios)
    for rec in records:
        out[assignment[_group_key(rec)]].append(rec)
    return out


def write_coco(records: Sequence[CaptionRecord], out_json_path, info: dict | None = None) -> None:
    """Write records as COCO-captions JSON; ``file_name`` is relative to the JSON's folder.

    Integer image ids are kept; other ids are replaced by 1..N and kept as ``metadata["source_id"]``.
    ``scene_id`` and ``domain`` from the metadata are also written at the image level.
    """
    from PIL import Image

    out = Path(out_json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    keep_ids = all(isinstance(r.image_id, int) for r in records) and len({r.image_id for r in records}) == len(records)
    for n, rec in enumerate(records, 1):
        meta = dict(rec.metadata)
        image_id = rec.image_id if keep_ids else n
        if not keep_ids:
            meta["source_id"] = rec.image_id
        width, height = meta.pop("width", None), meta.pop("height", None)
        if width is None or height is None:
            try:
                with Image.open(rec.path) as im:
                    width, height = im.size
            except OSError as exc:
                raise DatasetError(f"{rec.path}: cannot read image size ({exc})") from None
        entry = {"id": image_id, "file_name": Path(os.path.relpath(rec.path, out.parent.resolve())).as_posix()}
        entry.update(width=width, height=height)
        for key in ("scene_id", "domain"):
            if key in meta:
                entry[key] = meta.pop(key)
        entry["metadata"] = meta
        images.append(entry)
        for cap in rec.captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": cap})
    doc = {"info": info or {"description": "written by reefcap"}, "images": images, "annotations": annotations}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, out)  # a crash never leaves a half-written JSON behind
