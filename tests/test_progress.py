"""Training progress off a terminal: a plain line now and then, never a carriage-return redraw per step."""

from __future__ import annotations

import io

from reefcap.training import progress


def test_progress_lines_off_a_terminal():
    out = io.StringIO()  # not a TTY
    bar = progress.progress_bar(5, "damf", stream=out, mininterval=3600)  # one redraw an hour at most
    for _ in range(5):
        bar.update(1)
        bar.set_postfix(loss="1.0", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("damf: 100%") and "5/5" in lines[-1]


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    bar = progress.progress_bar(3, "x", enabled=False, stream=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
