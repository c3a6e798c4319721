"""``reefcap serve``'s flags and the README's settings table, both made from :class:`ServerSettings`' fields.

A setting is declared once, in ``settings.py``; its flag (``--name-with-dashes``), its variable (``REEFCAP_NAME``),
its default and its description follow from there, so the README cannot promise a flag that does not parse.
``python -m reefcap.server.flags [README.md]`` rewrites the README's table; a test fails while the two differ.
"""

from __future__ import annotations

import argparse
import sys
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from .settings import ServerSettings, env_name, flag_name

TABLE_START = "<!-- settings table: generated from server/settings.py by `python -m reefcap.server.flags` -->"
TABLE_END = "<!-- end of settings table -->"


def default_text(info: FieldInfo) -> str:
    """A field's default as a user would type it: ``unset``, ``true``, ``10``, ``JPEG,PNG``."""
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "empty"
    return str(value.value if isinstance(value, Enum) else value)


def _metavar(field: str, info: FieldInfo) -> str:
    kind = info.annotation
    if kind is int:
        return "N"
    if kind is float:
        return "SECONDS" if field.endswith("_s") else "MS" if field.endswith("_ms") else "X"
    if "Path" in str(kind):
        return "PATH"
    if "list" in str(kind):
        return "A,B"
    return "TEXT"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (variable-only ones in the epilog). Absent flags stay absent from the namespace, so
    the environment and the defaults decide them; values reach pydantic as typed, so a bad one is a settings error
    naming its rule."""
    variable_only = []
    for field, info in ServerSettings.model_fields.items():
        text = f"{info.description} (default: {default_text(info)}; {env_name(field)})".replace("%", "%%")
        flag = flag_name(field)
        if flag is None:
            variable_only.append(f"{env_name(field)}: {text}")
        elif info.annotation is bool:
            parser.add_argument(
                flag, dest=field, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            parser.add_argument(flag, dest=field, metavar=_metavar(field, info), default=argparse.SUPPRESS, help=text)
    if variable_only:
        parser.epilog = "variable only (flags show in `ps`): " + "; ".join(variable_only).replace("%", "%%")


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by field name."""
    return {field: getattr(args, field) for field in ServerSettings.model_fields if hasattr(args, field)}


def settings_table() -> str:
    """The README's table: flag, variable, default and meaning of every setting."""
    rows = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for field, info in ServerSettings.model_fields.items():
        flag = flag_name(field)
        cells = [f"`{flag}`" if flag else "variable only", f"`{env_name(field)}`", f"`{default_text(info)}`"]
        cells.append(str(info.description))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the part between the table markers replaced by :func:`settings_table`."""
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError("the README has no settings table markers")
    return f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(readme_with_table(path.read_text()))
