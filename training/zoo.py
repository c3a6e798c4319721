"""Package a trained run as a bundled model in ``models/zoo/<name>``: the Hugging Face files, and a
``manifest.json`` saying how it was made (recipe, data seed, exact commands), how it scores on each test
split, and the SHA-256 of every file, so a copy can be checked and the model rebuilt."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from reefcap.models.errors import ReefcapError
from reefcap.models.registry import ZOO_DIR, sha256_file

from .config import TRAIN_CONFIG_FILE

MANIFEST_FILE = "manifest.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "reefcap_factory.json",
    TRAIN_CONFIG_FILE,
    "reefcap_experts.json",  # water-type experts models only (GuiDG)
    "reefcap_experts.safetensors",
    "reefcap_router.json",  # the underwater / in-air router, for a model served routed with the in-air model
)


def pack(source: Path, name: str, manifest: dict, zoo: Path = ZOO_DIR) -> Path:
    """Copy the checkpoint files of ``source`` to ``zoo/name`` and write its manifest with file hashes."""
    if not (source / "config.json").is_file() or not (source / "model.safetensors").is_file():
        raise ReefcapError(f"{source}: not a trained checkpoint (config.json + model.safetensors expected)")
    dest = zoo / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for fname in MODEL_FILES:
        if (source / fname).is_file():
            shutil.copy(source / fname, dest / fname)
    write_manifest(dest, {"name": name, **manifest})
    return dest


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Write ``folder/manifest.json``: ``manifest`` plus the SHA-256 of every file in the folder (the manifest
    itself and run reports aside), so a copy can be checked and the quality gate can tell these numbers belong
    to these weights. Returns what was written."""
    skip = {MANIFEST_FILE}
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}
    payload = {**manifest, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def _pack(args: argparse.Namespace) -> int:
    metrics = {}
    for item in args.metrics:
        split, _, path = item.partition("=")
        if not path:
            raise ReefcapError(f"--metrics takes SPLIT=results.json, got {item!r}")
        metrics[split] = json.loads(Path(path).read_text())["metrics"]
    source = Path(args.source)
    train = json.loads((source / TRAIN_CONFIG_FILE).read_text()) if (source / TRAIN_CONFIG_FILE).is_file() else {}
    manifest = {
        "description": args.description,
        "recipe": train.get("recipe", {}).get("name"),
        "data": {"generator": args.data_command, "seed": args.data_seed},
        "commands": args.command,
        "metrics": metrics,
    }
    if (source / "reefcap_router.json").is_file():  # how its router was made and how well it routes
        router = json.loads((source / "reefcap_router.json").read_text()).get("info", {})
        manifest["router"] = {"file": "reefcap_router.json", **router}
    dest = pack(source, args.name, manifest, Path(args.zoo) if args.zoo else ZOO_DIR)
    print(json.dumps({"name": args.name, "path": str(dest)}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo-pack", help="bundle a trained checkpoint into models/zoo with a manifest")
    p.add_argument("source", help="checkpoint folder (a run's best/)")
    p.add_argument("--name", required=True)
    p.add_argument("--description", default="")
    p.add_argument("--data-command", default="", help="the command that generated the training data")
    p.add_argument("--data-seed", type=int)
    p.add_argument("--command", action="append", default=[], help="exact command used (repeatable, in order)")
    p.add_argument("--metrics", action="append", default=[], help="SPLIT=results.json from `reefcap eval --out`")
    p.add_argument("--zoo", help="zoo folder (default: the installed models/zoo)")
    p.set_defaults(handler=_pack)
