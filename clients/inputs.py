"""Turn what a user types (files, directories, globs, manifests) into an ordered list of image inputs.

A manifest lists images: ``.txt`` (one image path a line), ``.jsonl`` (objects with ``image``, ``path``
or ``file_name``), ``.csv`` (a column named like those) or COCO ``.json`` (``images[].file_name``). A
``.txt`` whose first entry is not an image path is taken as an image, so it gets an error line like any
other unreadable file. Relative paths in a manifest are relative to the manifest's folder. The order is
the user's; duplicates are kept once.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reefcap.models.data.images import IMAGE_SUFFIXES, images_under
from reefcap.models.errors import ReefcapError

MANIFEST_SUFFIXES = {".txt", ".jsonl", ".csv", ".json"}
PATH_KEYS = ("image", "path", "file_name", "file")


class InputError(ReefcapError):
    """An input argument or manifest that cannot be turned into image paths."""

    code = "bad_input"


@dataclass(frozen=True)
class ImageInput:
    """One image to caption: the key written to the output (``image``) and, for COCO manifests, its id."""

    image: str
    image_id: int | str | None = None


def _manifest_path(base: Path, value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: expected an image path, got {value!r}")
    path = Path(value.strip())
    return str(path if path.is_absolute() else base / path)


def read_image_manifest(path: Path) -> list[ImageInput]:
    """Image inputs listed in a manifest file; malformed rows raise :class:`InputError` naming file and line."""
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read manifest ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [
            ImageInput(_manifest_path(base, line, f"{path}:{n}"))
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            key = next((k for k in PATH_KEYS if isinstance(row, dict) and k in row), None)
            if key is None:
                raise InputError(f"{path}:{n}: no image path (expected one of {', '.join(PATH_KEYS)})")
            items.append(ImageInput(_manifest_path(base, row[key], f"{path}:{n}"), row.get("image_id", row.get("id"))))
        return items
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        key = next((k for k in PATH_KEYS if k in (reader.fieldnames or [])), None)
        if key is None:
            raise InputError(f"{path}:1: no image path column (expected one of {', '.join(PATH_KEYS)})")
        return [
            ImageInput(_manifest_path(base, row[key], f"{path}:{n}"), row.get("image_id") or None)
            for n, row in enumerate(reader, 2)
        ]
    try:
        data = json.loads(text)
        images = data["images"]
        return [
            ImageInput(_manifest_path(base, im["file_name"], f"{path}: images[{i}]"), im.get("id"))
            for i, im in enumerate(images)
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a COCO-style manifest with images[].file_name ({exc})") from None


def _is_manifest(path: Path) -> bool:
    """A .txt is a manifest only if its first entry names an image file; any other text is a (bad) image."""
    if path.suffix.lower() != ".txt":
        return True
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip() and not line.lstrip().startswith("#"):
                    return Path(line.strip()).suffix.lower() in IMAGE_SUFFIXES
    except (OSError, UnicodeDecodeError):
        return False
    return False


def expand_inputs(args: Iterable[str]) -> list[ImageInput]:
    """Expand each argument: a directory (recursively, sorted), a glob, a manifest, or an image path.

    A directory with no image files, or a glob that matches no file, raises :class:`InputError`.
    A path that does not exist is kept as an input, so it is reported as an error line like any other
    unreadable image rather than stopping the run.
    """
    out: dict[str, ImageInput] = {}
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = images_under(path)
            if not found:  # like a glob that matches nothing: most likely the wrong folder
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise InputError(f"{arg}: no images in this directory or below (looked for {suffixes})")
            items = [ImageInput(str(p)) for p in found]
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES and _is_manifest(path):
            items = read_image_manifest(path)
        elif not path.exists() and glob.has_magic(arg):
            items = [ImageInput(p) for p in sorted(glob.glob(arg, recursive=True)) if Path(p).is_file()]
            if not items:
                raise InputError(f"{arg}: the pattern matches no file")
        else:
            items = [ImageInput(arg)]
        for item in items:
            out.setdefault(item.image, item)
    return list(out.values())
