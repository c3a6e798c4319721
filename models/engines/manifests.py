"""What a model carries beside its weights: its checkpoint's ``manifest.json`` (evaluation metrics, the stored
int8 agreement, file hashes), its kind (plain BLIP or water-type experts) and its size.

Read the same way for a checkpoint folder, a zoo name, a hub id already resolved, or an ONNX export folder (whose
own manifest names the checkpoint it came from).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from reefcap.models.engines.experts import EXPERTS_CONFIG
from reefcap.models.engines.onnx_format import is_export
from reefcap.models.errors import ReefcapError
from reefcap.models.registry import resolve_model

MANIFEST = "manifest.json"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_folder(model: str | Path) -> Path | None:
    """The checkpoint folder ``model`` names: a zoo name, a local directory or a hub id (resolved, possibly
    fetched), or the folder an export was made from; None when it names none."""
    path = Path(model).expanduser()
    if is_export(path):
        origin = read_json(path / MANIFEST).get("source") or {}
        return Path(origin["path"]) if isinstance(origin.get("path"), str) else None
    try:
        return resolve_model(model).path
    except ReefcapError:
        return None


def checkpoint_manifest(model: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of the checkpoint ``model`` names (whatever backend runs it), or {}."""
    folder = checkpoint_folder(model)
    return read_json(folder / MANIFEST) if folder is not None else {}


def evaluation_manifest(source: str | Path) -> dict[str, Any]:
    """The manifest with a loaded engine's evaluation metrics, from its ``describe().source`` folder (a checkpoint,
    or an export cache entry whose checkpoint holds them); {} when absent."""
    data = read_json(Path(source) / MANIFEST)
    origin = data.get("source")
    if "metrics" not in data and isinstance(origin, dict) and isinstance(origin.get("path"), str):
        data = read_json(Path(origin["path"]) / MANIFEST)
    return data


def checkpoint_kind(model: str | Path) -> str:
    """``experts`` for a water-type experts checkpoint or its export, else ``blip``."""
    path = Path(model).expanduser()
    if is_export(path):
        return "experts" if read_json(path / MANIFEST).get("experts") else "blip"
    folder = checkpoint_folder(model)
    return "experts" if folder is not None and (folder / EXPERTS_CONFIG).is_file() else "blip"


def parameter_count(model: str | Path) -> int | None:
    """Parameters of the checkpoint ``model`` names, from its safetensors headers (no weights read) or an
    export's manifest; None when unknown."""
    path = Path(model).expanduser()
    if is_export(path):
        value = read_json(path / MANIFEST).get("parameters")
        return value if isinstance(value, int) else None
    folder = checkpoint_folder(model)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    try:
        for file in files:
            with safe_open(str(file), "np") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    total += math.prod(fh.get_slice(key).get_shape())
    except Exception:  # a damaged file: the engine's own load reports it, with the file's name
        return None
    return total


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, remembered for as long as its size and mtime stay (``size``/``mtime_ns`` are the key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_version(folder: Path) -> str:
    """Short content hash of a checkpoint's weights (every ``*.safetensors`` file, whole): the version a loaded
    model reports and the key of its ONNX exports. A hash of the whole files, not of their ends: two checkpoints
    that differ only mid-file (a retrained layer) once shared a version and an export cache entry."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        stat = file.stat()
        digest.update(file.name.encode())
        digest.update(_file_sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:12]
