"""Model registry and resolver: a bundled name, a local directory or a hub id becomes a checkpoint folder.

Resolution order: a bundled zoo name, then an existing local directory, then a Hugging Face hub id of the
form ``owner/name`` (the local HF cache first, then the network). Only safetensors weights are ever fetched
or loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError, ModelNotFoundError

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
# Files a captioning checkpoint needs; pickled *.bin weights are deliberately left out.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
# owner/name only: a bare name that is neither bundled nor a folder is far likelier a typo than a legacy
# un-namespaced hub model, and asking the hub for it costs a network round trip and a misleading message.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint folder on disk and the name to report for it."""

    name: str
    path: Path
    origin: str  # "zoo" | "local" | "hub"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (manifests record these for every file they describe)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def zoo_models() -> dict[str, Path]:
    """Bundled checkpoints by name (each a folder under ``models/zoo`` with a ``config.json``)."""
    if not ZOO_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ZOO_DIR.iterdir()) if (p / "config.json").is_file()}


def _check_checkpoint(path: Path, label: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{label}: no config.json in {path}; expected a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelLoadError(
                f"{label}: only pickled weights (*.bin/*.pt) found; reefcap loads safetensors only. "
                "Convert with `model.save_pretrained(dir)` from a trusted environment."
            )
        raise ModelLoadError(f"{label}: no *.safetensors weights in {path}")
    return path


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(os.sep)


def resolve_model(name_or_path: str | os.PathLike) -> ResolvedModel:
    """Find the checkpoint folder for a zoo name, a local directory or a hub id.

    Raises:
        ModelNotFoundError: nothing matched, or the hub could not be reached (the message says to pass a
            local directory instead).
        ModelLoadError: the folder exists but has no safetensors weights.
    """
    text = os.fspath(name_or_path)
    zoo = zoo_models()
    if text in zoo:
        return ResolvedModel(text, _check_checkpoint(zoo[text], text), "zoo")

    path = Path(text).expanduser()
    if path.is_dir():
        return ResolvedModel(path.resolve().name, _check_checkpoint(path.resolve(), text), "local")
    _refuse_unresolvable(text, path, zoo)
    return ResolvedModel(text, _check_checkpoint(_download(text), text), "hub")


def check_model_name(name_or_path: str | os.PathLike) -> None:
    """Raise :class:`ModelNotFoundError` now for a name that can only fail (not bundled, no such folder, not of
    a hub id's form), as :func:`resolve_model` would, but without asking the hub. Engines call it before
    importing torch or onnxruntime, so a mistyped ``--model`` is reported in a fraction of a second, not 4 s."""
    text = os.fspath(name_or_path)
    zoo = zoo_models()
    path = Path(text).expanduser()
    if text not in zoo and not path.is_dir():
        _refuse_unresolvable(text, path, zoo)


def _refuse_unresolvable(text: str, path: Path, zoo: dict[str, Path]) -> None:
    if path.exists():
        raise ModelNotFoundError(f"{text}: is a file; pass the checkpoint directory that holds config.json")
    known = ", ".join(zoo) or "none bundled"
    if "/" not in text and not _looks_like_path(text):
        raise ModelNotFoundError(
            f"{text}: not a bundled model name or a local directory (bundled models: {known}; "
            "a hub id has the form owner/name)"
        )
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelNotFoundError(f"{text}: no such model directory (bundled models: {known})")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:  # not cached: fall through to the network
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        reason = type(exc).__name__
        raise ModelNotFoundError(
            f"{repo_id}: could not download from the Hugging Face hub ({reason}). If this machine has no network, "
            "download the model elsewhere (or `reefcap model init`) and pass its local directory instead."
        ) from None
