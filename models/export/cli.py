"""`reefcap export` (ONNX export of a checkpoint) and `reefcap agreement` (int8 vs fp32 greedy captions, the
record dtype ``auto`` serves int8 by)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reefcap.models.errors import ReefcapError
from reefcap.models.policy.agreement import KERNEL_FLAGS as KINDS


def _export(args: argparse.Namespace) -> int:
    from reefcap.models.export.onnx import export_onnx, read_manifest

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ReefcapError(f"{out} is not empty; pass --force to overwrite")
    folder = export_onnx(args.model, out, args.precision, args.opset)
    manifest = read_manifest(folder)
    print(json.dumps({"out": str(folder), "precision": manifest["precision"], "files": manifest["files"]}))
    return 0


def _agreement_images(text: str) -> list[Path]:
    """The images under a folder, or those of a caption dataset file (any format ``reefcap eval`` reads)."""
    from reefcap.models.data.datasets import load_dataset
    from reefcap.models.data.images import IMAGE_SUFFIXES, images_under

    path = Path(text)
    if path.is_dir():
        found = images_under(path)
        if not found:
            raise ReefcapError(f"{path}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    return [record.path for record in load_dataset(path)]


def _agreement(args: argparse.Namespace) -> int:
    from reefcap.models.engines.base import require_positive
    from reefcap.models.engines.manifests import weights_version
    from reefcap.models.engines.precision import AGREEMENT_KEY, auto_dtype
    from reefcap.models.policy.agreement import MIN_IMAGES, cpu_kind, measure, record, write_record
    from reefcap.models.registry import resolve_model

    resolved = resolve_model(args.model)
    if args.write and resolved.origin != "local":
        raise ReefcapError(
            f"{args.model}: --write puts the record into the checkpoint folder's manifest.json, so it needs a local "
            f"checkpoint folder (this is a {resolved.origin} model); save it to a folder and pass that"
        )
    kind = cpu_kind()
    if args.write and kind is None:
        raise ReefcapError(f"this CPU has none of the int8 kernel flags the record names ({', '.join(KINDS)})")
    for name in ("batch_size", "max_images"):
        require_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    images = _agreement_images(args.images)[: args.max_images]
    if args.write and len(images) < MIN_IMAGES:
        raise ReefcapError(f"{len(images)} images cannot tell 95% from 90%; --write needs at least {MIN_IMAGES}")
    log = None if args.quiet else (lambda line: print(f"reefcap agreement: {line}", file=sys.stderr, flush=True))
    result = measure(str(resolved.path), images, args.batch_size, log)
    data = args.data_note or f"{len(images)} images from {args.images}, greedy, max length 20, against PyTorch fp32"
    entry = record(result, kind or "unknown", weights_version(resolved.path), data)
    reason = result.uninformative()
    serves, why = auto_dtype({AGREEMENT_KEY: entry}, {kind} if kind else set())
    if reason:
        serves, why = "fp32", f"{reason}: identical captions say nothing about this model"
    out: dict = {
        "model": args.model,
        "images": len(images),
        "identical": result.identical,
        "fraction": entry["identical"],
    }
    out |= {"cpu_flag": kind, "serve_would_pick": serves, "why": why, "differences": result.differences()}
    if args.write and reason:
        out["written"] = None
        print(json.dumps(out))
        raise ReefcapError(f"{why}, so no record was written")
    out["written"] = str(write_record(resolved.path, entry)) if args.write else None
    print(json.dumps(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="export a checkpoint to ONNX (vision encoder + KV-cached text decoder)")
    exp.add_argument("--model", required=True, help="bundled name, local HF directory or hub id")
    exp.add_argument("--out", required=True, help="directory to write (created)")
    exp.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    exp.add_argument("--opset", type=int, default=17)
    exp.add_argument("--force", action="store_true", help="overwrite a non-empty directory")
    exp.set_defaults(handler=_export)

    a = sub.add_parser(
        "agreement",
        help="how often the int8 export gives fp32's greedy caption on this CPU; --write records it for `serve`",
    )
    a.add_argument("--model", required=True, help="bundled name, local HF directory or hub id")
    a.add_argument("--images", required=True, help="a folder of images, or a caption dataset file")
    a.add_argument("--write", action="store_true", help="record the figure in the checkpoint's manifest.json")
    a.add_argument("--max-images", type=int, default=1000, help="use at most this many of the images")
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--data-note", help="what the images are, for the record (default: how many, from where)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a.set_defaults(handler=_agreement)
