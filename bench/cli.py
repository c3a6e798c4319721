"""`reefcap bench`: images/s and batch latency of every engine against the naive transformers pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reefcap.models.errors import ReefcapError
from reefcap.models.samples import sample_photos


def bench_model(name: str) -> str:
    """A checkpoint to benchmark; the factory kinds (``tiny``, ``blip-base-shape``) are created on first use
    under ``$REEFCAP_CACHE/bench`` unless a bundled model or a directory has that name."""
    from reefcap.models.engines.onnx_format import cache_root
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
    model = bench_model(args.model)
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


def register(sub: argparse._SubParsersAction) -> None:
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
