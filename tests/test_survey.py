"""Survey workflows of `reefcap caption`: progress in a log file, COCO ids, usage errors, the output lock,
input quality offline, and `reefcap model list` naming the defaults. Real engines, real files, real locks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reefcap.cli import main


def run(capsys, *args: str) -> tuple[int, list[dict], list[str]]:
    """`reefcap ARGS` in this process (stderr is captured, so not a terminal): exit, stdout records, stderr lines."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, [json.loads(x) for x in captured.out.splitlines()], captured.err.splitlines()


def test_model_list_names_the_default_primary_and_fallback(monkeypatch):
    for name in ("MODEL", "FALLBACK"):
        monkeypatch.delenv(f"REEFCAP_{name}", raising=False)
    from reefcap.server.settings import ServerSettings

    out = subprocess.run(
        [sys.executable, "-m", "reefcap.cli", "model", "list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    roles = {r["name"]: r["default"] for r in map(json.loads, out.splitlines())}
    settings = ServerSettings()
    assert roles[settings.model] == "primary" and roles[settings.fallback] == "fallback"
    assert sum(v is not None for v in roles.values()) == 2, roles


@pytest.mark.parametrize("flag", ["--coco-results", "--references"])
def test_reading_results_back_without_output_is_a_usage_error(capsys, euvp_images, tmp_path, flag):
    code, records, err = run(capsys, "caption", str(euvp_images[0]), flag, str(tmp_path / "x.json"))
    assert code == 2 and records == [] and len(err) == 1
    assert flag in err[0] and "needs -o/--output" in err[0]


def test_non_tty_progress_is_periodic_json_lines(capsys, varied_model, euvp_images):
    paths = [str(p) for p in euvp_images[:5]]
    common = ["caption", *paths, "--model", str(varied_model), "--greedy", "--batch-size", "2"]
    code, records, err = run(capsys, *common, "--progress-every", "0")
    assert code == 0 and len(records) == 5
    progress = [json.loads(line)["progress"] for line in err if line.startswith('{"progress"')]
    assert [p["done"] for p in progress] == [2, 4, 5] and {p["total"] for p in progress} == {5}
    assert progress[-1]["percent"] == 100.0 and progress[-1]["eta_s"] == 0.0
    assert all(p["images_per_second"] > 0 for p in progress)
    assert "summary" in json.loads(err[-1]) and not any("\r" in line for line in err)  # no bar redraws
    # The default interval (10 s) on a quick run: only the line for the last batch.
    code, _, err = run(capsys, *common)
    assert code == 0 and [json.loads(x)["progress"]["done"] for x in err if x.startswith('{"progress"')] == [5]
    code, _, err = run(capsys, *common, "-q")
    assert code == 0 and err == []


def test_directory_inputs_get_unique_stable_coco_ids(capsys, varied_model, euvp_images, tmp_path):
    folder = tmp_path / "dive"
    names = ["000001.jpg", "1.jpg", "7.jpg", "a/x.jpg", "b/x.jpg", "y.jpg"]
    for name, src in zip(names, euvp_images, strict=False):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / name)
    ids = []
    for attempt, extra in enumerate(([], ["--overwrite"])):
        out, coco = tmp_path / "r.jsonl", tmp_path / f"coco{attempt}.json"
        args = ["caption", str(folder), "-o", str(out), "--coco-results", str(coco), "--model", str(varied_model)]
        code, _, _ = run(capsys, *args, "--greedy", "-q", *extra)
        assert code == 0
        payload = json.loads(coco.read_text())
        ids.append({p["image_id"] for p in payload})
        assert len(payload) == 6 and len(ids[-1]) == 6, payload  # one distinct id per image
    assert ids[0] == ids[1]  # the same images get the same ids in another run
    # Unambiguous stems keep their meaning (a number stays a number); clashing ones get their path.
    assert 7 in ids[0] and "y" in ids[0] and 1 not in ids[0] and "x" not in ids[0]
    assert {str(folder / n) for n in ("000001.jpg", "1.jpg", "a/x.jpg", "b/x.jpg")} <= ids[0]


def test_coco_ids_do_not_depend_on_result_order_and_keep_manifest_ids():
    from reefcap.clients.results import coco_image_ids

    keys = ["d/000001.jpg", "d/1.jpg", "d/7.jpg", "m/img.jpg", "d/5.jpg"]
    forward = coco_image_ids(keys, {"m/img.jpg": 5})
    assert forward == coco_image_ids(reversed(keys), {"m/img.jpg": 5})
    assert forward == {
        "d/000001.jpg": "d/000001.jpg",
        "d/1.jpg": "d/1.jpg",
        "d/7.jpg": 7,
        "m/img.jpg": 5,
        "d/5.jpg": "d/5.jpg",
    }


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from reefcap.clients.results import ResultsWriter
    writer = ResultsWriter(sys.argv[1], resume=True)  # what a running `reefcap caption -o` holds
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_second_run_on_one_output_fails_cleanly_and_leaves_the_file_intact(capsys, varied_model, euvp_images, tmp_path):
    out = tmp_path / "survey.jsonl"
    out.write_text(json.dumps({"image": "earlier.jpg", "caption": "a fish"}) + "\n")
    before = out.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        common = ["caption", str(euvp_images[0]), "-o", str(out), "--model", str(varied_model), "--greedy"]
        for mode in ("--overwrite", "--resume"):
            code, _, err = run(capsys, *common, mode)
            assert code == 2 and len(err) == 1 and "being written by another reefcap run" in err[0], err
            assert out.read_bytes() == before  # neither truncated nor appended to
    finally:
        holder.communicate("", timeout=30)
    code, _, _ = run(capsys, *common, "--resume", "-q")  # the first run is over: the lock went with it
    assert code == 0 and [json.loads(x)["image"] for x in out.read_text().splitlines()][0] == "earlier.jpg"
    assert len(out.read_text().splitlines()) == 2


def test_quality_option_adds_the_servers_uiqm_and_uciqe(capsys, varied_model, euvp_images, tmp_path):
    from reefcap.models.data.images import ImageLimits
    from reefcap.server.service import decode_one

    paths = [str(p) for p in euvp_images[:3]] + [str(tmp_path / "missing.jpg")]
    code, records, _ = run(capsys, "caption", *paths, "--model", str(varied_model), "--greedy", "--quality", "-q")
    assert code == 1 and records[-1]["code"] == "not_found" and "quality" not in records[-1]
    for path, record in zip(paths, records[:3], strict=False):
        served = decode_one(Path(path).read_bytes(), ImageLimits(), 0)  # the server's own measurement
        assert record["quality"] == {"uiqm": served.uiqm, "uciqe": served.uciqe}
    _, plain, _ = run(capsys, "caption", paths[0], "--model", str(varied_model), "--greedy", "-q")
    assert plain[0]["quality"] is None  # one shape: the key is always there, null when not measured


def test_a_terminal_still_gets_the_bar_not_json_lines():
    import fcntl
    import os
    import struct
    import termios

    from reefcap.clients.progress import Progress

    master, slave = os.openpty()  # a real terminal device, as an interactive shell gives
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns, as a window has
    with os.fdopen(slave, "w") as tty:
        bar = Progress(4, stream=tty, every_s=0)
        for _ in range(4):
            bar.update(1)
        bar.close()
        tty.flush()
        shown = _read_all(master)
    os.close(master)
    assert "4/4" in shown and "\r" in shown and '"progress"' not in shown


def _read_all(fd: int) -> str:
    """Everything written to a pty so far: one read returns only the first chunk the terminal has ready."""
    import os
    import select

    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()
