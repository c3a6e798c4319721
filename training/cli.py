"""`reefcap data ...`: generate ReefScenes, preview it, report its realism, convert user datasets to COCO.

Only argparse at import time: handlers import numpy/PIL and the generators when they run (never torch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _reefscenes(args: argparse.Namespace) -> int:
    from reefcap.models.reefscenes.dataset import ReefScenesConfig, default_counts, generate

    counts = default_counts(args.domain, args.images, args.surface_images)
    config = ReefScenesConfig(seed=args.seed, size=args.size, counts=counts, workers=args.workers)
    result = generate(args.out, config, progress=not args.no_progress, force=args.force)
    print(json.dumps(result))
    return 0


def _preview(args: argparse.Namespace) -> int:
    from reefcap.models.reefscenes.realism import preview

    out = Path(args.out) if args.out else Path(args.dir) / "preview.png"
    print(json.dumps({"preview": str(preview(args.dir, out, n=args.n, split=args.split))}))
    return 0


def _report(args: argparse.Namespace) -> int:
    from reefcap.models.reefscenes.realism import write_report

    result = write_report(
        args.out, euvp=args.euvp, scenes=args.scenes, seed=args.seed, size=args.size, workers=args.workers
    )
    print(json.dumps(result))
    return 0 if result["passed"] else 1


def _convert(args: argparse.Namespace) -> int:
    from reefcap.models.data.datasets import load_dataset
    from reefcap.models.data.records import split_records, write_coco

    records = load_dataset(args.path, fmt=args.fmt, images_root=args.images_root)
    splits = split_records(records, seed=args.seed)
    out = Path(args.out)
    for name, recs in splits.items():
        write_coco(recs, out / f"{name}.json", info={"description": f"converted from {args.path}", "seed": args.seed})
    print(json.dumps({"out": str(out), "counts": {k: len(v) for k, v in splits.items()}}))
    return 0


def _underwater(args: argparse.Namespace) -> int:
    from reefcap.models.data.datasets import load_dataset
    from reefcap.models.data.records import DatasetError
    from reefcap.models.reefscenes.dataset import wet_dataset
    from reefcap.models.reefscenes.optics import WATER_TYPES

    if args.water_type and args.water_type not in WATER_TYPES:
        raise DatasetError(f"unknown water type {args.water_type!r}; expected one of {', '.join(WATER_TYPES)}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty; choose a new folder")
    records = load_dataset(args.path, fmt=args.fmt, images_root=args.images_root)
    result = wet_dataset(
        records, out, seed=args.seed, water_type=args.water_type, workers=args.workers, max_side=args.max_side
    )
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="generate, preview, check and convert captioning datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    gen = dsub.add_parser("reefscenes", help="generate the ReefScenes synthetic benchmark (in air and underwater)")
    gen.add_argument("--out", required=True, help="output directory; writes OUT/<domain>/{train,val,test}.json")
    gen.add_argument(
        "--images",
        type=int,
        help="scenes per domain (default: 10000 in air, 3176 underwater, the size of UICD)",
    )
    gen.add_argument("--surface-images", type=int, help="scenes in air when it should differ from --images")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=128, help="image size in pixels (square)")
    gen.add_argument("--domain", choices=["surface", "underwater", "both"], default="both")
    gen.add_argument("--workers", type=int, default=2, help="processes (output is the same for any number)")
    gen.add_argument("--force", action="store_true", help="replace existing output for these domains")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    gen.set_defaults(handler=_reefscenes)

    prev = dsub.add_parser("preview", help="PNG grid of in-air vs underwater renderings with their captions")
    prev.add_argument("dir", help="a ReefScenes output directory")
    prev.add_argument("--out", help="PNG to write (default DIR/preview.png)")
    prev.add_argument("--n", type=int, default=6, help="number of scenes")
    prev.add_argument("--split", choices=["train", "val", "test"], default="test")
    prev.set_defaults(handler=_preview)

    rep = dsub.add_parser("report", help="compare UIQM/UCIQE/colour cast of renderings with real EUVP photos")
    rep.add_argument("--out", default="docs", help="folder for reefscenes-report.md and its PNG")
    rep.add_argument(
        "--euvp", default=None, help="folder with raw/ and enhanced/ photos (default: examples/photos/euvp)"
    )
    rep.add_argument("--scenes", type=int, default=200)
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--size", type=int, default=256, help="rendering size (EUVP photos are 256 px)")
    rep.add_argument("--workers", type=int, default=2)
    rep.set_defaults(handler=_report)

    conv = dsub.add_parser("convert", help="read any supported caption dataset, write COCO train/val/test JSON")
    conv.add_argument("path", help="dataset file or directory")
    conv.add_argument("--out", required=True, help="directory for train.json, val.json, test.json")
    conv.add_argument(
        "--fmt", default="auto", choices=["auto", "coco", "karpathy", "flickr", "jsonl", "csv", "imagefolder"]
    )
    conv.add_argument("--images-root", help="folder image paths are relative to (default: the file's folder)")
    conv.add_argument("--seed", type=int, default=0, help="seed of the 70/15/15 split when the data has none")
    conv.set_defaults(handler=_convert)

    wet = dsub.add_parser("underwater", help="render any captioned dataset underwater (captions kept), as COCO")
    wet.add_argument("path", help="dataset file or directory (any supported format)")
    wet.add_argument("--out", required=True, help="new directory for images/ and train/val/test.json")
    wet.add_argument("--fmt", default="auto")
    wet.add_argument("--images-root", help="folder image paths are relative to")
    wet.add_argument("--water-type", help="one Jerlov type for all images (default: sampled per image)")
    wet.add_argument("--seed", type=int, default=0)
    wet.add_argument("--max-side", type=int, help="shrink larger images to this many pixels on their long side")
    wet.add_argument("--workers", type=int, default=2)
    wet.set_defaults(handler=_underwater)
