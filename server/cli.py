"""`reefcap serve` and `reefcap feedback export` (`reefcap feedback post` is the clients' side)."""

from __future__ import annotations

import argparse
import json

FLAGS = [  # (flag, settings field, type, help)
    ("--host", "host", str, "address to bind (default 127.0.0.1; `make serve` uses 0.0.0.0)"),
    ("--port", "port", int, "port (default 8000)"),
    ("--model", "model", str, "primary model: zoo name, local directory or hub id (default reefscenes-tiny-damf)"),
    ("--fallback", "fallback", str, "fallback model (default reefscenes-tiny; 'none' for no fallback)"),
    ("--backend", "backend", str, "torch | onnx | auto (default: the fastest available)"),
    ("--device", "device", str, "auto | cpu | cuda[:N]"),
    ("--dtype", "dtype", str, "auto | fp32 | int8 | bf16 | fp16"),
    ("--inference-threads", "inference_threads", int, "PyTorch / ONNX Runtime threads (0: cores minus one)"),
    ("--max-batch-size", "max_batch_size", int, "largest inference batch (images)"),
    ("--max-wait-ms", "max_wait_ms", float, "longest wait of the oldest queued image before its batch runs"),
    ("--max-queue", "max_queue", int, "queued images beyond which requests get 503"),
    ("--request-timeout-s", "request_timeout_s", float, "per-request deadline (504 after it)"),
    ("--api-key", "api_key", str, "require 'Authorization: Bearer KEY' (not on /, health and metrics)"),
    ("--models-dir", "models_dir", str, "folder of models /v1/admin/reload may load by name (needs REEFCAP_ADMIN_KEY)"),
    ("--feedback-db", "feedback_db", str, "SQLite file for served captions and feedback"),
    ("--reload-poll-s", "reload_poll_s", float, "watch the primary's folder every N s and hot-reload (0: off)"),
    ("--log-level", "log_level", str, "uvicorn log level"),
    # Bounds on what one client can cost (issue 13 part B)
    ("--max-request-cost", "max_request_cost", int, "largest images x num_beams x max_length per request"),
    ("--max-connections", "max_connections", int, "open connections beyond which new ones are closed"),
    ("--read-timeout-s", "read_timeout_s", float, "seconds a client has to send a request head, and its body"),
    ("--drain-timeout-s", "drain_timeout_s", float, "on SIGTERM, seconds to finish queued work (then 503)"),
]


def _serve(args: argparse.Namespace) -> int:
    import logging

    from reefcap.models.errors import ReefcapError
    from reefcap.models.policy import fallback_name

    from .app import create_app
    from .feedback import FeedbackStore
    from .limits import run
    from .metrics import Metrics
    from .pool import build_pool
    from .settings import ServerSettings

    overrides = {field: getattr(args, field) for _, field, _, _ in FLAGS if getattr(args, field) is not None}
    if "fallback" in overrides:
        overrides["fallback"] = fallback_name(overrides["fallback"])
    try:
        settings = ServerSettings(**overrides)
    except Exception as exc:  # pydantic ValidationError: name the bad setting on one line
        raise ReefcapError(f"invalid settings: {' '.join(str(exc).split())}") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A feedback database that cannot be written stops the start with one line (exit 2), before any model loads:
    # a server that answered ready while dropping every record would hide the fault.
    FeedbackStore(settings.feedback_db).close()
    # Load before binding the port: with no model at all the command fails at once with one line.
    # The app reports to these same metrics (create_app takes them from the pool).
    pool = build_pool(settings, Metrics(), log_if_any=True)
    if not pool.ready:
        fallback = f"fallback {settings.fallback!r} ({pool.fallback_error})" if settings.fallback else "no fallback"
        raise ReefcapError(
            f"no model could be loaded: primary {settings.model!r} ({pool.primary_error}); {fallback}. "
            "Pass --model DIR (e.g. one written by `reefcap model init --kind tiny --out DIR`)."
        )
    # limits.run: connection cap, read timeouts, and a drain that starts on SIGTERM (fractions of a second too).
    run(create_app(settings, pool), settings)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .feedback import FeedbackStore, open_store_readonly_check
    from .settings import ServerSettings

    db = open_store_readonly_check(args.db or ServerSettings().feedback_db)
    store = FeedbackStore(db)
    try:
        print(json.dumps(store.export(args.out)))
    finally:
        store.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the caption HTTP server (settings also from REEFCAP_* variables)")
    for flag, field, kind, text in FLAGS:
        serve.add_argument(flag, dest=field, type=kind, default=None, help=text)
    serve.set_defaults(handler=_serve)

    from reefcap.cli import FEEDBACK_HELP, command_group

    fsub = command_group(sub, "feedback", FEEDBACK_HELP)
    export = fsub.add_parser("export", help="write feedback as COCO-captions train/val/test sets (split by image)")
    export.add_argument("--out", required=True, help="directory to write (train/val/test.json, captions.json, images/)")
    export.add_argument("--db", help="feedback database (default: REEFCAP_FEEDBACK_DB or reefcap-feedback.sqlite3)")
    export.set_defaults(handler=_export)
