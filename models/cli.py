"""`reefcap model ...` subcommands: create checkpoints and list the bundled ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ReefcapError


def _read_captions(path: Path) -> list[str]:
    """Captions from a text file (one a line) or a COCO-captions JSON file (its ``annotations``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReefcapError(f"{path}: cannot read captions ({exc.strerror or exc})") from None
    if path.suffix == ".json":
        try:
            return [a["caption"] for a in json.loads(text)["annotations"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ReefcapError(f"{path}: not a COCO-captions file ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _init(args: argparse.Namespace) -> int:
    from .factory import FACTORIES, TinyConfig

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ReefcapError(f"{out} is not empty; pass --force to overwrite")
    captions = _read_captions(Path(args.captions)) if args.captions else None
    if args.kind == "tiny":
        FACTORIES["tiny"](out, captions, TinyConfig(image_size=args.image_size, seed=args.seed))
    else:
        FACTORIES[args.kind](out, captions, seed=args.seed)
    print(json.dumps({"kind": args.kind, "out": str(out)}))
    return 0


def _list(args: argparse.Namespace) -> int:
    from reefcap.models.policy import DEFAULT_FALLBACK, DEFAULT_PRIMARY

    from .registry import zoo_models

    # The constants `reefcap serve` and `reefcap caption` default to, so the listing cannot drift from them.
    roles = {DEFAULT_PRIMARY: "primary", DEFAULT_FALLBACK: "fallback"}
    for name, path in zoo_models().items():
        print(json.dumps({"name": name, "path": str(path), "default": roles.get(name)}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="create or list captioning checkpoints")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    init = msub.add_parser("init", help="write a new randomly initialised BLIP checkpoint in HF format")
    init.add_argument("--kind", choices=["tiny", "blip-base-shape"], required=True)
    init.add_argument("--out", required=True, help="directory to write (created)")
    init.add_argument("--captions", help="captions to train the tokenizer on: a .txt (one a line) or COCO .json")
    init.add_argument("--image-size", type=int, default=96, help="input resolution of the tiny model")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--force", action="store_true", help="write into a non-empty directory")
    init.set_defaults(handler=_init)

    lst = msub.add_parser(
        "list", help="list the bundled models; 'default' says which serve as the default primary and fallback"
    )
    lst.set_defaults(handler=_list)
