"""`reefcap serve` and `reefcap feedback export` (`reefcap feedback post` is the clients' side)."""

from __future__ import annotations

import argparse
import json


def _serve(args: argparse.Namespace) -> int:
    import logging

    from reefcap.models.policy import fallback_name

    from .flags import flag_overrides
    from .settings import load_settings

    overrides = flag_overrides(args)
    if "fallback" in overrides:
        overrides["fallback"] = fallback_name(overrides["fallback"])
    settings = load_settings(**overrides)  # a bad setting: one line naming it and its rule, never a secret
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ray:
        from .ray_serve import serve_on_ray

        return serve_on_ray(settings)
    from .processes import serve

    # A feedback database that cannot be written stops the start with one line (exit 2), before any model loads:
    # a server that answered ready while dropping every record would hide the fault. Models load before the port
    # is bound: with no model at all the command fails at once with one line. Then uvicorn under limits.run's
    # bounds (connection cap, read timeouts, a drain that starts on SIGTERM), in one process or several.
    return serve(settings)


def _export(args: argparse.Namespace) -> int:
    from .feedback import FeedbackStore, open_store_readonly_check
    from .settings import load_settings

    if args.db:
        db = open_store_readonly_check(args.db)
    else:
        settings = load_settings()
        db = open_store_readonly_check(settings.feedback_dsn or settings.feedback_db)
    store = FeedbackStore(db)
    try:
        print(json.dumps(store.export(args.out)))
    finally:
        store.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .flags import add_flags

    serve = sub.add_parser("serve", help="run the caption HTTP server (settings also from REEFCAP_* variables)")
    add_flags(serve)  # one flag per setting of ServerSettings, with its default and its REEFCAP_* variable
    serve.set_defaults(handler=_serve)

    from reefcap.cli import FEEDBACK_HELP, command_group

    fsub = command_group(sub, "feedback", FEEDBACK_HELP)
    export = fsub.add_parser("export", help="write feedback as COCO-captions train/val/test sets (split by image)")
    export.add_argument("--out", required=True, help="directory to write (train/val/test.json, captions.json, images/)")
    export.add_argument(
        "--db",
        help="feedback database: a SQLite file or a postgresql:// URL (default: REEFCAP_FEEDBACK_DSN, else "
        "REEFCAP_FEEDBACK_DB or reefcap-feedback.sqlite3)",
    )
    export.set_defaults(handler=_export)
