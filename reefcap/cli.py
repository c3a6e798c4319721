"""The `reefcap` command. Each package contributes its subcommands through a ``register(subparsers)`` hook.

Handlers import their heavy dependencies lazily, so ``reefcap --help`` stays fast. Errors that are the
user's to fix (:class:`ReefcapError`, bad arguments) end as one line on stderr and exit status 2; an
unexpected failure ends as one line and exit status 3 (``REEFCAP_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from reefcap import __version__

# One entry per package that adds subcommands; a package adds itself here and nowhere else.
COMMAND_MODULES = [
    "reefcap.models.cli",
    "reefcap.models.export.cli",
    "reefcap.clients.cli",
    "reefcap.training.cli",
    "reefcap.server.cli",
    "reefcap.clients.feedback_cli",
    "reefcap.training.train_cli",
    "reefcap.bench.cli",
]

FEEDBACK_HELP = "reference captions for served images: post them to a server, export them for training"
EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other usage error: one line on stderr, exit status 2.

    Stock argparse prints the whole usage block first (ten lines for `caption`). Subparsers are built
    with the parent's class, so every subcommand gets this too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def command_group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The ACTION subparsers of command ``name`` (created on first use), so that packages can each add actions
    to one command: ``reefcap feedback export`` (server/) and ``reefcap feedback post`` (clients/)."""
    groups = sub.__dict__.setdefault("_reefcap_groups", {})
    if name not in groups:
        parser = sub.add_parser(name, help=help)
        groups[name] = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)
    return groups[name]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reefcap", description="Caption underwater imagery with adapted BLIP models.")
    parser.add_argument("--version", action="version", version=f"reefcap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Quiet third-party chatter (progress bars, advisory warnings) that would mix with JSON on stdout.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from reefcap.models.errors import ReefcapError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ReefcapError as exc:
        print(f"reefcap: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("reefcap: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `reefcap caption ... | head` closed stdout early: not an error
        return EXIT_OK
    except Exception as exc:  # a bug, not bad input: still one line, with the traceback on request
        if os.environ.get("REEFCAP_DEBUG"):
            raise
        print(
            f"reefcap: internal error: {type(exc).__name__}: {exc} (set REEFCAP_DEBUG=1 for details)", file=sys.stderr
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
