"""Caption datasets in the formats users have, read into one record type.

Formats (``fmt``): ``coco`` (COCO-captions JSON, also what ReefScenes writes), ``karpathy`` (the Karpathy
split JSON for COCO/Flickr), ``flickr`` (Flickr8k/30k token files, ``name.jpg#N<TAB>caption``), ``jsonl``
and ``csv`` manifests (an image path and a ``caption`` or a ``captions`` list per row; several rows for one
image are merged), and ``imagefolder`` (a Hugging Face imagefolder ``metadata.jsonl``). ``auto`` picks one
from the file name and contents. Malformed rows raise :class:`~reefcap.models.data.records.DatasetError` naming
the file and line (or the JSON entry); images that do not exist are named too. The record type, splitting
and COCO writing are in :mod:`reefcap.models.data.records`.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from reefcap.models.data.records import CaptionRecord, DatasetError

FORMATS = ("coco", "karpathy", "flickr", "jsonl", "csv", "imagefolder")
# Column/key names accepted for the image path and the caption(s) in manifests and imagefolder metadata.
IMAGE_KEYS = ("image", "file_name", "image_path", "path", "filepath", "filename", "image_name")
CAPTION_KEYS = ("caption", "text", "sentence", "comment")
CAPTIONS_KEYS = ("captions", "sentences", "texts")
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}


def _where(path: Path, line: int | None = None, entry: str | None = None) -> str:
    return f"{path}:{line}" if line is not None else (f"{path} [{entry}]" if entry else str(path))


class _Builder:
    """Collects captions per image in first-seen order, so several rows for one image merge into a record."""

    def __init__(self, source: Path, root: Path):
        self.source, self.root = source, root
        self.records: dict[Any, dict] = {}

    def add(self, image_id, rel_path, captions: Iterable, metadata: dict | None, where: str) -> None:
        if not isinstance(rel_path, str) or not rel_path.strip():
            raise DatasetError(f"{where}: missing image path")
        caps = []
        for cap in captions:
            if not isinstance(cap, str) or not cap.strip():
                raise DatasetError(f"{where}: caption must be a non-empty string, got {cap!r}")
            caps.append(cap.strip())
        path = Path(rel_path) if os.path.isabs(rel_path) else self.root / rel_path
        rec = self.records.setdefault(image_id, {"path": path.resolve(), "captions": [], "metadata": {}})
        if rec["path"] != path.resolve():
            raise DatasetError(f"{where}: image id {image_id!r} already used for {rec['path']}")
        rec["captions"].extend(caps)
        rec["metadata"].update(metadata or {})

    def build(self, check_images: bool) -> list[CaptionRecord]:
        out = []
        for image_id, rec in self.records.items():
            if not rec["captions"]:
                raise DatasetError(f"{self.source}: image {image_id!r} ({rec['path']}) has no captions")
            out.append(CaptionRecord(image_id, rec["path"], tuple(rec["captions"]), rec["metadata"]))
        if check_images:
            missing = [r.path for r in out if not r.path.is_file()]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                shown = ", ".join(str(p) for p in missing[:3])
                raise DatasetError(f"{self.source}: {len(missing)} image(s) not found: {shown}{more}")
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _pick(row: dict, keys: Sequence[str]) -> tuple[str | None, Any]:
    for key in keys:
        if key in row:
            return key, row[key]
    return None, None


def _row_captions(row: dict, where: str, csv_mode: bool = False) -> list:
    key, many = _pick(row, CAPTIONS_KEYS)
    if key is not None:
        if csv_mode and isinstance(many, str):  # a CSV cell: a JSON list or captions separated by "|"
            many = json.loads(many) if many.strip().startswith("[") else many.split("|")
        if not isinstance(many, list) or not many:
            raise DatasetError(f"{where}: '{key}' must be a non-empty list of captions")
        return many
    key, one = _pick(row, CAPTION_KEYS)
    if key is None:
        raise DatasetError(f"{where}: no caption (expected one of {', '.join(CAPTION_KEYS + CAPTIONS_KEYS)})")
    return [one]


def _manifest_row(b: _Builder, row: dict, where: str, csv_mode: bool = False) -> None:
    key, image = _pick(row, IMAGE_KEYS)
    if key is None:
        raise DatasetError(f"{where}: no image path (expected one of {', '.join(IMAGE_KEYS)})")
    try:
        captions = _row_captions(row, where, csv_mode)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: captions cell is not a JSON list ({exc.msg})") from None
    used = {key, "image_id", *CAPTION_KEYS, *CAPTIONS_KEYS}
    meta = {k: v for k, v in row.items() if k not in used and v not in (None, "")}
    if "split" in meta and isinstance(meta["split"], str):
        meta["split"] = SPLIT_ALIASES.get(meta["split"].lower(), meta["split"])
    b.add(row.get("image_id", image), image, captions, meta, where)


def _load_coco(path: Path, b: _Builder) -> None:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise DatasetError(f"{path}: not a COCO-captions file (needs 'images' and 'annotations' lists)")
    files: dict[Any, tuple[str, dict]] = {}
    for i, img in enumerate(data["images"]):
        where = _where(path, entry=f"images[{i}]")
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DatasetError(f"{where}: an image needs 'id' and 'file_name'")
        meta = {k: v for k, v in img.items() if k not in ("id", "file_name", "metadata")}
        meta.update(img.get("metadata") or {})
        files[img["id"]] = (img["file_name"], meta)
    for i, ann in enumerate(data["annotations"]):
        where = _where(path, entry=f"annotations[{i}]")
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DatasetError(f"{where}: an annotation needs 'image_id' and 'caption'")
        if ann["image_id"] not in files:
            raise DatasetError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        name, meta = files[ann["image_id"]]
        b.add(ann["image_id"], name, [ann["caption"]], meta, where)


def _load_karpathy(path: Path, b: _Builder) -> None:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a Karpathy split file (needs an 'images' list)")
    for i, img in enumerate(data["images"]):
        where = _where(path, entry=f"images[{i}]")
        if not isinstance(img, dict) or "filename" not in img or not isinstance(img.get("sentences"), list):
            raise DatasetError(f"{where}: an image needs 'filename' and a 'sentences' list")
        caps = []
        for j, s in enumerate(img["sentences"]):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(s["tokens"])
            if not isinstance(raw, str):
                raise DatasetError(f"{where}: sentences[{j}] has no 'raw' text or 'tokens'")
            caps.append(raw)
        rel = os.path.join(img.get("filepath") or "", img["filename"])
        meta = {"split": SPLIT_ALIASES.get(str(img.get("split", "")).lower(), img.get("split"))}
        meta = {k: v for k, v in meta.items() if v}
        image_id = img.get("cocoid", img.get("imgid", img["filename"]))
        b.add(image_id, rel, caps, meta, where)


def _load_flickr(path: Path, b: _Builder) -> None:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            name, sep, caption = line.rstrip("\n").partition("\t")
            if not sep or "#" not in name:
                raise DatasetError(f"{path}:{lineno}: expected 'image.jpg#N<TAB>caption'")
            image = name.rsplit("#", 1)[0].strip()
            b.add(image, image, [caption], None, f"{path}:{lineno}")


def _load_jsonl(path: Path, b: _Builder) -> None:
    for lineno, row in _jsonl_rows(path):
        _manifest_row(b, row, f"{path}:{lineno}")


def _first_line(path: Path) -> str:
    with path.open(encoding="utf-8-sig") as fh:
        for line in fh:
            if line.strip():
                return line
    return ""


def _delimiter(path: Path) -> str:
    """Tab for .tsv; otherwise the most frequent of , | ; tab in the header (Kaggle's Flickr30k uses |)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    header = _first_line(path)
    return max((",", "|", ";", "\t"), key=header.count) if header else ","


def _load_csv(path: Path, b: _Builder) -> None:
    delimiter = _delimiter(path)
    with path.open(encoding="utf-8-sig", newline="") as fh:  # -sig: spreadsheets often start with a BOM
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            raise DatasetError(f"{path}:1: empty CSV (a header row is required)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise DatasetError(f"{where}: expected {len(reader.fieldnames)} columns")
            _manifest_row(b, {k.strip(): v.strip() for k, v in row.items()}, where, csv_mode=True)


def _load_imagefolder(path: Path, b: _Builder) -> None:
    for lineno, row in _jsonl_rows(path):
        where = f"{path}:{lineno}"
        if not isinstance(row.get("file_name"), str):
            raise DatasetError(f"{where}: an imagefolder row needs 'file_name'")
        _manifest_row(b, row, where)


LOADERS = {
    "coco": _load_coco,
    "karpathy": _load_karpathy,
    "flickr": _load_flickr,
    "jsonl": _load_jsonl,
    "csv": _load_csv,
    "imagefolder": _load_imagefolder,
}


def detect_format(path: Path) -> str:
    """The format of a dataset file, from its name and (for JSON) its top-level keys."""
    suffix, name = path.suffix.lower(), path.name.lower()
    if name == "metadata.jsonl":
        return "imagefolder"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".token":
        return "flickr"
    if suffix == ".txt":  # Flickr token lines ("name.jpg#0<TAB>caption"), or a CSV such as Kaggle's captions.txt
        line = _first_line(path)
        if re.match(r"[^\t#]+#\d+\t", line):
            return "flickr"
        columns = {c.strip().lower() for c in re.split(r"[,|;\t]", line)}
        return "csv" if columns & set(IMAGE_KEYS) and columns & set(CAPTION_KEYS + CAPTIONS_KEYS) else "flickr"
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            return "karpathy"
    raise DatasetError(f"{path}: cannot tell the dataset format; pass fmt= one of {', '.join(FORMATS)}")


def _dataset_files(path: Path) -> list[tuple[Path, str | None]]:
    """The files a directory holds: a metadata.jsonl, per-split metadata.jsonl folders, or split JSONs."""
    if (path / "metadata.jsonl").is_file():
        return [(path / "metadata.jsonl", None)]
    found = []
    for split_dir in ("train", "validation", "val", "test"):
        meta, js = path / split_dir / "metadata.jsonl", path / f"{split_dir}.json"
        if meta.is_file():
            found.append((meta, SPLIT_ALIASES[split_dir]))
        elif js.is_file():
            found.append((js, SPLIT_ALIASES[split_dir]))
    if not found:
        raise DatasetError(f"{path}: no metadata.jsonl, <split>/metadata.jsonl or <split>.json in this directory")
    return found


def load_dataset(path, fmt: str = "auto", images_root=None, check_images: bool = True) -> list[CaptionRecord]:
    """Read a caption dataset file (or a directory of split files) into records with absolute image paths.

    ``images_root`` is the folder image paths are relative to (default: the dataset file's folder).
    With ``check_images`` every image must exist. Records from per-split files carry ``metadata["split"]``.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: dataset not found")
    files = _dataset_files(path) if path.is_dir() else [(path, None)]
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    records: list[CaptionRecord] = []
    for file, split in files:
        kind = detect_format(file) if fmt == "auto" else fmt
        root = Path(images_root) if images_root is not None else file.parent
        builder = _Builder(file, root.resolve())
        try:
            LOADERS[kind](file, builder)
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{file}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise DatasetError(f"{file}: cannot read ({exc.strerror or exc})") from None
        for rec in builder.build(check_images):
            if split is not None:
                rec = CaptionRecord(rec.image_id, rec.path, rec.captions, {**rec.metadata, "split": split})
            records.append(rec)
    if not records:
        raise DatasetError(f"{path}: the dataset holds no images")
    return records
