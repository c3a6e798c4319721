"""`reefcap serve` and `reefcap feedback export` (`reefcap feedback post` is the clients' side)."""

from __future__ import annotations

import argparse
import json


def _serve(args: argparse.Namespace) -> int:
    import logging

    from reefcap.models.errors import ReefcapError
    from reefcap.models.policy import fallback_name

    from .app import create_app
    from .feedback import FeedbackStore
    from .flags import flag_overrides
    from .limits import run
    from .metrics import Metrics
    from .pool import build_pool
    from .settings import load_settings

    overrides = flag_overrides(args)
    if "fallback" in overrides:
        overrides["fallback"] = fallback_name(overrides["fallback"])
    settings = load_settings(**overrides)  # a bad setting: one line naming it and its rule, never a secret
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
    from .settings import load_settings

    db = open_store_readonly_check(args.db or load_settings().feedback_db)
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
    export.add_argument("--db", help="feedback database (default: REEFCAP_FEEDBACK_DB or reefcap-feedback.sqlite3)")
    export.set_defaults(handler=_export)
