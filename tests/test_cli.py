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
        assert set(line) == {
            *("image", "caption", "model", "fallback", "route", "confidence", "tokens", "water_type", "quality")
        }
        # a model without a router: nothing routed, so no route to name
        assert line["fallback"] == {"used": False, "reason": None} and line["quality"] is None and line["route"] is None
        assert line["model"]["name"] == "m" and line["confidence"] <= 0 and isinstance(line["caption"], str)


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


def test_a_mistyped_model_is_reported_before_torch_is_imported(euvp_images, tmp_path):
    """The names are checked first, so a typo costs a fraction of a second, not the 4 s of importing torch."""
    probe = (
        "import sys\nfrom reefcap.cli import main\ncode = main(sys.argv[1:])\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n"
        "sys.exit(code)"
    )
    for flags in (["--model", "reefscenes-tiny-dmaf"], ["--fallback", str(tmp_path / "nope")]):
        args = [sys.executable, "-c", probe, "caption", str(euvp_images[0]), *flags]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert "torch not imported" in result.stderr and "Traceback" not in result.stderr
    assert "pass --fallback none" in result.stderr


def test_init_refuses_non_empty_directory(cli_model):
    result = reefcap("model", "init", "--kind", "tiny", "--out", str(cli_model))
    assert result.returncode == 2 and "--force" in result.stderr


def test_help_lists_commands():
    result = reefcap("--help")
    assert result.returncode == 0
    assert "caption" in result.stdout and "model" in result.stdout


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, nothing on stdout, exactly one line on stderr naming the problem, and no crash report."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0] and "Traceback" not in result.stderr and "internal error" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
        (["--beams", "-2"], ["num_beams must be between 1 and 16, got -2"]),
        (["--max-length", "3"], ["max_length 3"]),
        (["--workers", "-1"], ["--workers must be at least 1"]),
        (["--device", "gpu"], ["'gpu'", "auto, cpu, cuda or cuda:N"]),
        (["--device", "cuda:x"], ["'cuda:x'", "auto, cpu, cuda or cuda:N"]),
        (["--batch-size", "x"], ["--batch-size", "invalid int value"]),
        (["--dtype", "int4"], ["--dtype", "invalid choice"]),
    ],
)
def test_bad_values_are_one_line_usage_errors(euvp_images, flags, fragments):
    # Checked before the model loads: none of these cases needs a checkpoint.
    assert_usage_error(reefcap("caption", str(euvp_images[0]), *flags), *fragments)


def test_unwritable_output_is_a_usage_error(euvp_images, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a file where -o needs a folder: no OS or user can write under it
    result = reefcap("caption", str(euvp_images[0]), "-o", str(blocker / "out.jsonl"))
    assert_usage_error(result, str(blocker / "out.jsonl"), "cannot write results")


def test_directory_without_images_is_a_usage_error(tmp_path):
    (tmp_path / "notes.md").write_text("no pictures here")
    assert_usage_error(reefcap("caption", str(tmp_path)), str(tmp_path), "no images in this directory")


def test_bare_unknown_model_name_lists_bundled_models_without_asking_the_hub(euvp_images):
    result = reefcap("caption", str(euvp_images[0]), "--model", "reefscenes-tiny-dmaf")
    assert_usage_error(result, "not a bundled model name or a local directory", "reefscenes-tiny-damf", "owner/name")
    assert "could not download" not in result.stderr


def test_missing_file_gives_not_found_error_line(cli_model, euvp_images, tmp_path):
    gone = tmp_path / "gone.jpg"
    result = reefcap("caption", str(gone), str(euvp_images[0]), "--model", str(cli_model), "--greedy", "-q")
    assert result.returncode == 1 and result.stderr == ""
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first == {"image": str(gone), "error": f"{gone}: no such file", "code": "not_found"}
    assert "caption" in second


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["eval", "--model", "m", "--data", "d.json", "--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["eval", "--model", "m", "--data", "d.json", "--device", "gpu"], ["'gpu'", "auto, cpu, cuda or cuda:N"]),
        (["eval", "--model", "m", "--data", "d.json", "--beams", "-2"], ["num_beams"]),
        (["serve", "--device", "gpu"], ["invalid settings", "'gpu'", "auto, cpu, cuda or cuda:N"]),
    ],
)
def test_other_commands_check_the_same_values(args, fragments):
    assert_usage_error(reefcap(*args), *fragments)
