"""`reefcap feedback post`: send reference captions for served images to a running server.

One item from flags (``--request-id ID [--index N] --reference TEXT ...``) or many from a JSONL file, one object
a line with ``request_id``, ``index`` (default 0) and ``references`` (a list, or ``reference``: one string). The
lines ``reefcap caption --server -o results.jsonl`` writes carry ``request_id`` and ``index``: add references to
them and post the file. Every line is checked before anything is sent (a bad line is a usage error, exit 2);
an item the server refuses (e.g. a request id it no longer keeps) is reported on stderr and the rest are still
posted (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from reefcap.models.errors import ReefcapError


def read_items(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(``FILE:LINE``, feedback body) for every non-blank line of a JSONL file; raises on the first bad line."""
    from .http import _feedback_body

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReefcapError(f"{p}: cannot read ({exc})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ReefcapError(f"{where}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ReefcapError(f"{where}: expected an object with request_id, index and references")
        refs = row.get("references", row.get("reference"))
        try:
            items.append((where, _feedback_body(row.get("request_id"), row.get("index", 0), refs or [])))
        except ReefcapError as exc:
            raise ReefcapError(f"{where}: {exc}") from None
    if not items:
        raise ReefcapError(f"{p}: no feedback lines")
    return items


def _items(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    from .http import _feedback_body

    if args.file:
        if args.request_id or args.reference:
            raise ReefcapError("give either --file or --request-id with --reference, not both")
        return read_items(args.file)
    if not args.request_id or not args.reference:
        raise ReefcapError("give --request-id and at least one --reference (or --file FILE.jsonl)")
    return [("item", _feedback_body(args.request_id, args.index, args.reference))]


def _post(args: argparse.Namespace) -> int:
    import httpx

    from .http import ReefcapClient, ReefcapHTTPError

    items = _items(args)  # every line checked before the first post
    posted, failed = 0, 0
    with ReefcapClient(args.server, api_key=args.api_key, timeout=args.timeout) as client:
        for where, body in items:
            try:
                client.feedback(body["request_id"], body["index"], body["references"])
                posted += 1
            except ReefcapHTTPError as exc:
                if exc.status >= 500 or exc.status == 401:  # the server or the key, not this item: stop
                    raise
                failed += 1
                print(f"reefcap: {where}: {exc}", file=sys.stderr)
            except httpx.HTTPError as exc:
                raise ReefcapError(f"cannot reach {args.server}: {exc}") from None
    print(json.dumps({"posted": posted, "failed": failed}))
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    from reefcap.cli import FEEDBACK_HELP, command_group

    post = command_group(sub, "feedback", FEEDBACK_HELP).add_parser(
        "post",
        help="post reference captions for served images (one, or a JSONL of request_id/index/references)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    post.add_argument("--server", required=True, metavar="URL", help="the server that captioned the images")
    post.add_argument("--file", metavar="JSONL", help="one object a line: request_id, index, references")
    post.add_argument("--request-id", help="the request_id of a served caption")
    post.add_argument("--index", type=int, default=0, help="the image's index in that request (default 0)")
    post.add_argument("--reference", action="append", help="a reference caption (repeatable)")
    post.add_argument("--api-key", default=None, help="bearer key (default: $REEFCAP_API_KEY)")
    post.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    post.set_defaults(handler=_post)
