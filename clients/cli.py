"""`reefcap caption`: caption image files with a local engine, one JSON line per image.

Exit status: 0 when every image was captioned, 1 when at least one image failed (its line carries an
``error``), 2 on a usage error or a model that cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys


def _caption(args: argparse.Namespace) -> int:
    from reefcap.models.backends import load_engine
    from reefcap.models.engine import DecodeOptions, EngineConfig

    from .batch import BatchCaptioner

    engine = load_engine(args.model, backend=args.backend, config=EngineConfig(device=args.device, dtype=args.dtype))
    options = DecodeOptions(num_beams=1 if args.greedy else args.beams, max_length=args.max_length)
    failed = 0
    for record in BatchCaptioner(engine, args.batch_size, options).run(args.paths):
        failed += "error" in record
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images, printing one JSON line per image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files")
    p.add_argument("--model", default="reefscenes-tiny-damf", help="bundled name, local HF directory or hub id")
    p.add_argument("--backend", default="torch", help="caption engine backend: torch or onnx (default: torch)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of 3-beam search")
    p.add_argument("--beams", type=int, default=3, help="beam width when not --greedy")
    p.add_argument("--max-length", type=int, default=20, help="maximum tokens, decoder prompt included")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "int8"], help="int8: onnx backend only")
    p.set_defaults(handler=_caption)
