"""Issue 25 (1, 5): what `reefcap serve` tells a user about its settings, as a real subprocess.

A settings error is one line naming the setting and the rule it broke, exit 2, and never any of a secret's
characters; every setting is a flag (secrets marked variable-only excepted) and a REEFCAP_* variable, and the
README's table and `serve --help` are made from the settings model itself.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from reefcap.server.settings import ServerSettings

README = Path(__file__).resolve().parents[1] / "README.md"
# Every setting the model marks secret, and the two known ones even if a marker were lost.
SECRETS = sorted(
    {"api_key", "admin_key"}
    | {n for n, f in ServerSettings.model_fields.items() if (f.json_schema_extra or {}).get("secret")}
)


def _secret(seed: int, length: int = 32) -> str:
    # Letters and digits in no order a message could hold by chance (a hex key would match "8000" or "dead").
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(length))


def _serve(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REEFCAP_")}
    cmd = [sys.executable, "-m", "reefcap.cli", "serve", *flags]
    return subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def _assert_one_clean_line(result: subprocess.CompletedProcess, secrets: list[str], *names: str) -> str:
    for secret in secrets:  # not the value, nor any four characters of it in a row
        windows = {secret[i : i + 4] for i in range(len(secret) - 3)}
        leaked = sorted(w for w in windows if w in result.stderr)
        assert not leaked, f"stderr shows {leaked} of a secret: {result.stderr}"
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("reefcap: error: invalid settings"), line
    assert "Traceback" not in result.stderr and "pydantic.dev" not in line and "input_value" not in line
    for name in names:
        assert name in line, line
    return line


@pytest.mark.parametrize("field", SECRETS)
def test_a_settings_error_never_shows_a_secret(field):
    """For each secret: the two keys equal, another setting broken while it is set, and its own rule broken."""
    env_name = "REEFCAP_" + field.upper()
    value = _secret(len(field))
    # Before: pydantic's dump of the whole input, 20 of the key's 32 characters included.
    same = {"REEFCAP_API_KEY": value, "REEFCAP_ADMIN_KEY": value}
    _assert_one_clean_line(_serve(same), [value], "admin_key", "api_key")
    line = _assert_one_clean_line(_serve({env_name: value}, "--port", "99999"), [value], "port", "65535")
    assert "less than or equal" in line
    # The secret's own rule: a key is sent in an Authorization header, so it is visible ASCII without spaces.
    bad = value[:16] + " " + value[16:] + "\u00e9"
    _assert_one_clean_line(_serve({env_name: bad}), [value[:16], value[16:]], field)


def test_secret_settings_are_marked_and_hidden_from_repr():
    settings = ServerSettings(api_key=_secret(1), admin_key=_secret(2), _env_file=None)
    for field in ("api_key", "admin_key"):
        assert (ServerSettings.model_fields[field].json_schema_extra or {}).get("secret"), field
    assert _secret(1) not in repr(settings) and _secret(2) not in repr(settings)


def _flags_in_readme() -> set[str]:
    """The flags the README names for `reefcap serve`: its settings table and every `reefcap serve` line."""
    text = README.read_text()
    flags = set()
    for line in text.splitlines():
        if line.startswith("| `--") or re.search(r"\breefcap serve\b", line):
            command = line.split("reefcap serve", 1)[-1] if "reefcap serve" in line else line.split("|")[1]
            flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", command))
    return flags - {"--help", "--name-with-dashes"}


def test_every_documented_flag_parses_and_every_setting_has_one():
    from reefcap.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    known = {s for action in serve._actions for s in action.option_strings}
    documented = _flags_in_readme()
    assert {"--max-images-per-request", "--max-pixels", "--cors-origins", "--inference-workers"} <= documented
    assert documented <= known, f"the README names flags `serve` does not have: {sorted(documented - known)}"
    for field, info in ServerSettings.model_fields.items():
        if not (info.json_schema_extra or {}).get("variable_only"):
            assert "--" + field.replace("_", "-") in known, field


@pytest.mark.parametrize(
    ("flags", "field", "value"),
    [
        (["--max-images-per-request", "4"], "max_images_per_request", 4),
        (["--max-pixels", "1000"], "max_pixels", 1000),
        (["--cors-origins", "http://a.test,http://b.test"], "cors_origins", ["http://a.test", "http://b.test"]),
        (["--inference-workers", "2"], "inference_workers", 2),
        (["--no-warm-up"], "warm_up", False),
        (["--formats", "jpeg png"], "formats", ["JPEG", "PNG"]),
    ],
)
def test_the_flags_the_readme_promised_reach_the_settings(flags, field, value):
    from reefcap.cli import build_parser
    from reefcap.server.flags import flag_overrides

    args = build_parser().parse_args(["serve", *flags])
    assert getattr(ServerSettings(**flag_overrides(args)), field) == value


def test_serve_help_shows_each_default_and_variable():
    from reefcap.server.flags import default_text

    result = subprocess.run(
        [sys.executable, "-m", "reefcap.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    flat = "".join(result.stdout.split())  # argparse wraps at spaces and hyphens
    for field, info in ServerSettings.model_fields.items():
        assert "REEFCAP_" + field.upper() in flat, field
        assert "".join(f"default: {default_text(info)}".split()) in flat, (field, default_text(info))


def test_readme_settings_table_is_the_generated_one():
    from reefcap.server.flags import readme_with_table

    text = README.read_text()
    assert readme_with_table(text) == text, "README settings table is stale: run `python -m reefcap.server.flags`"
