"""`reefcap export` (ONNX export of a checkpoint) and `reefcap bench` (engines vs the naive baseline)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reefcap.models.errors import ReefcapError
from reefcap.models.policy.agreement import KERNEL_FLAGS as KINDS
from reefcap.models.samples import sample_photos


def _export(args: argparse.Namespace) -> int:
    from reefcap.models.export.onnx import export_onnx, read_manifest

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ReefcapError(f"{out} is not empty; pass --force to overwrite")
    folder = export_onnx(args.model, out, args.precision, args.opset)
    manifest = read_manifest(folder)
    print(json.dumps({"out": str(folder), "precision": manifest["precision"], "files": manifest["files"]}))
    return 0


def _bench_model(name: str) -> str:
    """A checkpoint to benchmark; the factory kinds (``tiny``, ``blip-base-shape``) are created on first use
    under ``$REEFCAP_CACHE/bench`` unless a bundled model or a directory has that name."""
    from reefcap.models.export.onnx import cache_root
    from reefcap.models.factory import FACTORIES
    from reefcap.models.registry import zoo_models

    if name not in FACTORIES or name in zoo_models() or Path(name).is_dir():
        return name
    path = cache_root().parent / "bench" / name
    if not (path / "config.json").is_file():
        print(f"reefcap bench: creating a {name} checkpoint in {path}", file=sys.stderr)
        FACTORIES[name](path)
    return str(path)


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ReefcapError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(not 1 <= s <= 1024 for s in sizes):
        raise ReefcapError(f"--batch-sizes must be between 1 and 1024, got {text!r}")
    return sizes


def _bench(args: argparse.Namespace) -> int:
    from reefcap.bench.engines import engine_variants, machine_note, markdown, run_bench

    sizes = _parse_sizes(args.batch_sizes)
    if args.images:
        folder = Path(args.images)
        images = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not images:
            raise ReefcapError(f"no images in {folder}; pass --images DIR")
    else:
        images = sample_photos("raw")
    variants = None
    if args.engines:
        known = {f"{b}:{d}:{t}": (b, d, t) for b, d, t in engine_variants(torch_cuda=True, ort_cuda=True)}
        wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ReefcapError(f"unknown engines {unknown}; choose from {', '.join(known)}")
        variants = [known[w] for w in wanted]
    model = _bench_model(args.model)
    rows = run_bench(
        model,
        images,
        sizes,
        caption_length=args.caption_length,
        budget_s=args.budget,
        repeats=args.repeats,
        naive_images=args.naive_images,
        variants=variants,
        log=lambda row: print(json.dumps(row.to_dict()), flush=True),
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        title = f"## {rows[0].model}\n\n" if rows else ""
        section = title + markdown(rows, machine_note(), args.caption_length) + "\n"
        if args.append and out.exists():
            section = out.read_text() + section
        elif args.header:
            section = args.header.replace("\\n", "\n") + "\n\n" + section
        out.write_text(section)
        print(f"reefcap bench: wrote {out}", file=sys.stderr)
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
    from reefcap.models.engines.precision import AGREEMENT_KEY, auto_dtype
    from reefcap.models.engines.torch_engine import weights_version
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

    b = sub.add_parser("bench", help="images/s and batch latency of every engine vs the naive pipeline")
    b.add_argument("--model", required=True, help="checkpoint, or `tiny` / `blip-base-shape` to create one")
    b.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    b.add_argument("--engines", help="comma list of backend:device:dtype (default: all usable here)")
    b.add_argument("--images", help="folder of photos (default: the EUVP samples in examples/photos/euvp/raw)")
    b.add_argument("--caption-length", type=int, default=20, help="fixed tokens per caption, prompt included")
    b.add_argument("--budget", type=float, default=10.0, help="seconds per (engine, batch size) cell")
    b.add_argument("--repeats", type=int, default=5, help="most batches per cell")
    b.add_argument("--naive-images", type=int, default=4, help="most images timed for the naive baseline")
    b.add_argument("--out", help="write the Markdown table here")
    b.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    b.add_argument("--header", help="text put above the table when --out is (re)written")
    b.set_defaults(handler=_bench)

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
