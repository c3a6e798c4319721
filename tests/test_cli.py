"""The `reefcap` command as a user runs it: a real subprocess, JSON lines on stdout, documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def reefcap(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reefcap.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "m"
    result = reefcap("model", "init", "--kind", "tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"kind": "tiny", "out": str(out)}
    return out


def test_caption_prints_one_json_line_per_image(cli_model, euvp_images):
    result = reefcap("caption", str(euvp_images[0]), str(euvp_images[1]), "--model", str(cli_model), "--greedy")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(euvp_images[0]), str(euvp_images[1])]
    for line in lines:
        assert set(line) == {"image", "caption", "model", "confidence"}
        assert line["model"] == "m" and line["confidence"] <= 0 and isinstance(line["caption"], str)


def test_bad_file_gives_error_line_keeps_going_and_exits_1(cli_model, euvp_images, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    result = reefcap("caption", str(text), str(euvp_images[0]), "--model", str(cli_model), "--batch-size", "1")
    assert result.returncode == 1
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["image"] == str(text) and "not a recognised image format" in first["error"]
    assert first["code"] == "not_an_image"
    assert second["image"] == str(euvp_images[0]) and "caption" in second
    assert "Traceback" not in result.stderr


def test_missing_model_is_a_one_line_error(euvp_images, tmp_path):
    result = reefcap("caption", str(euvp_images[0]), "--model", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.startswith("reefcap: error:") and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_init_refuses_non_empty_directory(cli_model):
    result = reefcap("model", "init", "--kind", "tiny", "--out", str(cli_model))
    assert result.returncode == 2 and "--force" in result.stderr


def test_help_lists_commands():
    result = reefcap("--help")
    assert result.returncode == 0
    assert "caption" in result.stdout and "model" in result.stdout
