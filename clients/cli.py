"""`reefcap caption`: caption images with a local engine, a running server, or a Ray cluster.

Inputs are image files, directories (searched recursively), glob patterns, or manifests (.txt, .jsonl,
.csv, COCO .json). Results are one JSON line per image, on stdout or appended per batch to ``-o FILE``;
``--resume`` skips the images already in that file, so a killed run loses nothing and repeats nothing.

Exit status: 0 when every image was captioned, 1 when at least one image failed (its line carries an
``error``), 2 on a usage error or a model that cannot be loaded, 3 on an internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def _checked(args: argparse.Namespace) -> tuple[Any, Any]:
    """Decoding options and engine config from the flags, every value checked before any input is read or
    model loaded, so a typo fails at once as a usage error (exit 2) and not minutes later as a crash."""
    from reefcap.models.engines.base import DecodeOptions, EngineConfig, require_positive

    from .inputs import InputError

    needs_output = (("--resume", args.resume), ("--coco-results", args.coco_results), ("--references", args.references))
    for flag, value in needs_output:
        if value and not args.output:  # these read the results back from the file: stdout alone is not enough
            raise InputError(f"{flag} needs -o/--output: the results file it reads back")
    for flag, value in (("--batch-size", args.batch_size), ("--concurrency", args.concurrency)):
        require_positive(flag, value)
    for flag, value in (("--workers", args.workers), ("--ray-cpus", args.ray_cpus)):
        if value is not None:
            require_positive(flag, value)
    if not args.progress_every >= 0:
        raise InputError(f"--progress-every must be 0 seconds or more, got {args.progress_every}")
    if not args.timeout > 0:
        raise InputError(f"--timeout must be more than 0 seconds, got {args.timeout}")
    options = DecodeOptions(num_beams=1 if args.greedy else args.beams, max_length=args.max_length).validate()
    config = EngineConfig(backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads)
    return options, config


def _source(args: argparse.Namespace, options: Any, config: Any):
    """The batch producer for the chosen mode: a function from image names to lists of records."""
    from reefcap.models.policy import fallback_name

    fallback = fallback_name(args.fallback)
    if args.server:
        from .http import ReefcapClient, run_on_server

        client = ReefcapClient(args.server, api_key=args.api_key, timeout=args.timeout)
        return lambda names: run_on_server(client, names, options, args.batch_size, args.concurrency, args.quality)
    if args.ray is not None:
        from .ray_runner import run_on_ray

        address = None if args.ray == "local" else args.ray
        return lambda names: run_on_ray(
            names, args.model, config, address, args.batch_size, options, args.ray_cpus, fallback, quality=args.quality
        )
    from reefcap.models.policy import open_policy

    from .batch import BatchCaptioner

    # The server's models and policy, offline: the same loader and defaults; no primary timeout (a slow machine
    # is not a failing model).
    policy = open_policy(args.model, fallback, config)
    return BatchCaptioner(policy, args.batch_size, options, args.workers, quality=args.quality).run_batches


def _check_server(args: argparse.Namespace) -> None:
    """--server: reachable and taking the key, before a results file is touched or a line written (else exit 2)."""
    from .http import ReefcapClient, check_server

    with ReefcapClient(args.server, api_key=args.api_key, timeout=args.timeout) as client:
        check_server(client)


def _caption(args: argparse.Namespace) -> int:
    from .inputs import expand_inputs
    from .progress import Progress
    from .results import ResultsWriter, read_results, write_coco_results

    options, config = _checked(args)
    inputs = expand_inputs(args.paths)
    if args.server:
        _check_server(args)
    writer = ResultsWriter(args.output, resume=args.resume, overwrite=args.overwrite) if args.output else None
    todo = [i.image for i in inputs if writer is None or i.image not in writer.done]

    counts = {"captioned": 0, "failed": 0}
    fallbacks: Counter[str] = Counter()  # images the fallback answered, by reason (every mode's lines say)
    routes: Counter[str] = Counter()  # images by the router's domain (lines of a routed model say)
    bar = None
    try:  # from here on the results file is locked: closed (and unlocked) however the run ends
        run = _source(args, options, config)
        start = time.monotonic()
        bar = Progress(len(todo), quiet=args.quiet, every_s=args.progress_every)
        for records in run(todo):
            if writer is not None:
                writer.write(records)
            else:
                sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                sys.stdout.flush()
            failed = sum("error" in r for r in records)
            counts["failed"] += failed
            counts["captioned"] += len(records) - failed
            fallbacks.update(r["fallback"]["reason"] for r in records if (r.get("fallback") or {}).get("used"))
            routes.update(r["route"]["domain"] for r in records if r.get("route"))
            bar.update(len(records))
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    elapsed = time.monotonic() - start
    summary = {
        **counts,
        "fallbacks": dict(fallbacks),
        "routes": dict(routes),
        "skipped": len(inputs) - len(todo),
        "seconds": round(elapsed, 3),
        "images_per_second": round(len(todo) / elapsed, 3) if elapsed > 0 and todo else 0.0,
    }

    if args.output and (args.coco_results or args.references):
        results = list(read_results(Path(args.output)))
        ids = {i.image: i.image_id for i in inputs}
        if args.coco_results:
            write_coco_results(results, ids, args.coco_results)
        if args.references:
            from .scoring import score_results

            summary["metrics"] = score_results(results, ids, Path(args.references))
    if not args.quiet:
        print(json.dumps({"summary": summary}), file=sys.stderr)
    return 1 if counts["failed"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images, printing one JSON line per image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="INPUT", help="image files, directories, globs or manifests")
    p.add_argument("-o", "--output", help="append results here (JSONL) instead of printing them")
    p.add_argument("--resume", action="store_true", help="skip images already in --output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--coco-results", metavar="FILE", help="also write COCO results format (needs -o)")
    p.add_argument("--references", metavar="COCO_JSON", help="score the captions against these references (needs -o)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="URL", help="caption through a running reefcap server")
    where.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS", help="run on Ray (a local instance if no address)"
    )
    _model_arguments(p)
    _remote_arguments(p)
    _output_arguments(p)
    p.set_defaults(handler=_caption)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """Which models caption and how they run and decode: the server's defaults, through the same loader."""
    from reefcap.models.engines.base import BACKEND_CHOICES, DTYPE_CHOICES
    from reefcap.models.policy import DEFAULT_FALLBACK, DEFAULT_PRIMARY

    p.add_argument(
        "--model", default=DEFAULT_PRIMARY, help=f"bundled name, local directory or hub id (default: {DEFAULT_PRIMARY})"
    )
    p.add_argument(
        "--fallback",
        default=DEFAULT_FALLBACK,
        metavar="NAME|none",
        help="model that answers when the primary fails or collapses, as the server's does "
        f"(default: {DEFAULT_FALLBACK}; 'none' turns it off). Each line's 'fallback' says whether it answered "
        "and why. Ignored with --server (the server uses its own)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_CHOICES,
        help="caption engine backend (default: auto, as the server: ONNX Runtime where it imports, else PyTorch)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default: up to 4)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of 3-beam search")
    p.add_argument("--beams", type=int, default=3, help="beam width when not --greedy")
    p.add_argument("--max-length", type=int, default=20, help="maximum tokens, decoder prompt included")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="default auto, as the server: int8 where the model's stored int8 agreement holds on this CPU (onnx "
        "backend), else fp32",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="the model's intra-op threads (default 0, as the server: one per core minus one; every core for a "
        "model of 50 M parameters or more)",
    )


def _remote_arguments(p: argparse.ArgumentParser) -> None:
    """Knobs of ``--server`` and ``--ray``."""
    p.add_argument("--api-key", default=None, help="bearer key for --server (default: $REEFCAP_API_KEY)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight with --server")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds with --server")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs for a local Ray instance")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    from .progress import DEFAULT_EVERY_S

    p.add_argument(
        "--quality",
        action="store_true",
        help="add each input's UIQM and UCIQE ('quality', as the server reports them; costs a little speed)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary on stderr")
    p.add_argument(
        "--progress-every",
        type=float,
        default=DEFAULT_EVERY_S,
        metavar="SECONDS",
        help=f"off a terminal, a one-line JSON progress record at most this often (default {DEFAULT_EVERY_S:g})",
    )
